"""Shared helpers of the training tests (tiny SAM, tiny runs on a few real LA cases) and tests of the
command line and the entry scripts.

Every run here is tiny: V-Net n_filters 4, patches 32x32x16, batch 4 (2 labeled), a handful of iterations,
a tiny random SAM-Med3D (img 32, 4^3 token grid) saved in the official checkpoint format.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from networks.sam_med3d import build_sam3d_from_config, sam3d_config
from networks.vnet import VNet
from training.config import TrainConfig, parse_config

CODE_DIR = Path(__file__).resolve().parents[1]
N_CASES = 4
PATCH = ["32", "32", "16"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a loaded 2-core machine OpenMP's spinning
    threads make such runs tens of times slower; restored afterwards for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_sam_config() -> dict:
    """A small SAM-Med3D config in the registry format: img 32, patch 8 (4^3 tokens), prompt dim 48."""
    c = sam3d_config("vit_tiny_demo")
    c["name"] = "tiny_test"
    c["image_encoder"].update(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=48,
                              window_size=6, global_attn_indexes=[1])
    c["prompt_encoder"].update(embed_dim=48, image_embedding_size=[4, 4, 4], input_image_size=[32, 32, 32],
                               mask_in_chans=8)
    c["mask_decoder"].update(transformer_dim=48, iou_head_hidden_dim=16)
    c.pop("hard_coded", None)
    return c


def write_tiny_sam(folder: Path, seed: int = 0, name: str = "tiny_sam.pth") -> tuple[Path, Path]:
    """A random tiny SAM saved as the official {'model_state_dict': sd}; returns (checkpoint, config json)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "tiny_sam.json"
    cfg_path.write_text(json.dumps(tiny_sam_config()))
    torch.manual_seed(seed)
    model = build_sam3d_from_config(tiny_sam_config())
    ckpt = folder / name
    torch.save({"model_state_dict": model.state_dict()}, ckpt)
    return ckpt, cfg_path


def write_train_list(folder: Path, la_root: Path, n: int = N_CASES) -> Path:
    """The first ``n`` cases of the real train.list, written to ``folder/train.list``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [s.strip() for s in (la_root / "train.list").read_text().splitlines() if s.strip()][:n]
    path = folder / "train.list"
    path.write_text("\n".join(names) + "\n")
    return path


def run_args(root_path, train_list, model_dir, exp, *extra, iters=3) -> list[str]:
    """Command-line flags of a tiny CPU run."""
    return ["--root_path", str(root_path), "--train_list", str(train_list), "--model_dir", str(model_dir),
            "--exp", exp, "--labeled_num", "2", "--max_iterations", str(iters), "--patch_size", *PATCH,
            "--n_filters", "4", "--num_workers", "0", "--device", "cpu", "--cache", "1", "--progress", "0",
            "--image_every", "2", "--tune_malloc", "0", "--threads", "1", *[str(e) for e in extra]]


def sam_args(ckpts, cfg_json) -> list[str]:
    return ["--generalist", *[str(c) for c in ckpts], "--generalist_arch", str(cfg_json), "--num_clicks", "3"]


def weights(trainer) -> dict:
    """Student, teacher and optimizer state of a finished Trainer (for bit-identity checks)."""
    return {"student": {k: v.clone() for k, v in trainer.student.state_dict().items()},
            "teacher": None if trainer.teacher is None else
            {k: v.clone() for k, v in trainer.teacher.state_dict().items()},
            "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizer.state_dict()["state"].values()]}


def assert_identical(a: dict, b: dict) -> None:
    assert a["student"].keys() == b["student"].keys()
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), f"student {k} differs"
    assert (a["teacher"] is None) == (b["teacher"] is None)
    if a["teacher"] is not None:
        for k in a["teacher"]:
            assert torch.equal(a["teacher"][k], b["teacher"][k]), f"teacher {k} differs"
    assert len(a["momentum"]) == len(b["momentum"])
    for x, y in zip(a["momentum"], b["momentum"]):
        assert torch.equal(x, y)


def read_iteration_lines(log: Path) -> list[dict]:
    """Parse log.txt 'iteration N : name: value, ...' lines into dicts (with 'iteration')."""
    rows = []
    for line in log.read_text().splitlines():
        if "] iteration " not in line:
            continue
        head, _, tail = line.partition(" : ")
        row = {"iteration": int(head.rsplit(" ", 1)[1])}
        for part in tail.split(", "):
            k, v = part.split(": ")
            row[k] = float(v)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- tests
def test_script_settings_and_flag_precedence():
    """Entry scripts only hold settings; flags override them; paper defaults are in place."""
    scripts = {name: runpy.run_path(str(CODE_DIR / f"{name}.py"), run_name="not_main")["SETTINGS"]
               for name in ("train_LA_sup", "train_LA_mt", "train_LA_uamt", "train_LA_semisam_mt",
                            "train_LA_semisam_plus")}
    for name in scripts:
        src = (CODE_DIR / f"{name}.py").read_text()
        # thin: settings then the shared main, no training code of its own
        assert "def " not in src and "class " not in src and "for " not in src.split('"""')[-1], name
        assert "run_script(SETTINGS)" in src and "from training.run import run_script" in src

    uamt = parse_config(scripts["train_LA_uamt"], [])
    assert (uamt.specialist, uamt.generalist_term, uamt.labeled_num) == ("uamt", "none", 16)
    assert (uamt.max_iterations, uamt.batch_size, uamt.labeled_bs, uamt.patch_size) == (6000, 4, 2, (112, 112, 80))
    assert (uamt.base_lr, uamt.seed, uamt.n_filters, uamt.has_dropout) == (0.01, 1337, 16, True)
    assert (uamt.consistency, uamt.consistency_rampup, uamt.ema_decay, uamt.uamt_passes) == (0.1, 40.0, 0.99, 8)
    assert uamt.save_every == 1000 and uamt.val_every == 0
    assert parse_config(scripts["train_LA_mt"], []).specialist == "mt"
    assert parse_config(scripts["train_LA_sup"], []).specialist == "none"
    semi = parse_config(scripts["train_LA_semisam_mt"], [])
    assert (semi.patch_size, semi.labeled_num, semi.generalist_term, semi.prompt, semi.num_clicks) == \
        ((128, 128, 128), 4, "semisam", "point", 10)
    assert semi.generalist == ["../ckpt/sam_med3d.pth"] and semi.generalist_arch == "vit_b_ori"
    plus = parse_config(scripts["train_LA_semisam_plus"], [])
    assert plus.generalist_term == "semisam_plus" and len(plus.generalist) == 2

    over = parse_config(scripts["train_LA_semisam_mt"],
                        ["--labeled_num", "8", "--patch_size", "112", "112", "80", "--specialist", "uamt",
                         "--prompt", "mask", "--sam_weight", "0.5", "--generalist", "a.pth", "b.pth",
                         "--amp", "bf16", "--cache", "1", "--max_iterations", "10", "--stop_after", "4"])
    assert (over.labeled_num, over.patch_size, over.specialist, over.prompt, over.sam_weight) == \
        (8, (112, 112, 80), "uamt", "mask", 0.5)
    assert over.generalist == ["a.pth", "b.pth"] and over.amp == "bf16" and over.cache is True
    assert over.stop_after == 4
    off = parse_config(scripts["train_LA_semisam_mt"], ["--generalist", "none"])
    assert off.generalist == [] and off.generalist_term == "none"
    assert parse_config({}, ["--root_path", "/x/data/cases"]).train_list_path == Path("/x/data/train.list")


@pytest.mark.parametrize("argv, message", [
    (["--patch_size", "32", "32", "20"], "multiples of 16"),
    (["--labeled_bs", "5"], "labeled_bs must be in"),
    (["--specialist", "fancy"], "specialist 'fancy' unknown"),
    (["--generalist_term", "semisam"], "needs at least one --generalist"),
    (["--labeled_bs", "4"], "need unlabeled patches"),
    (["--val_every", "5"], "needs --val_list"),
    (["--stop_after", "7", "--max_iterations", "6"], "stop_after must be in"),
])
def test_bad_settings_are_refused_with_a_clear_message(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config({"specialist": "mt"}, argv)
    with pytest.raises(KeyError, match="unknown training settings"):
        parse_config({"specialis": "mt"}, [])


def test_entry_script_runs_from_the_command_line(la_root, la_data_dir, tmp_path):
    """python train_LA_mt.py <flags> in code/: outputs land in <model_dir>/<exp>/ and load into VNet."""
    train_list = write_train_list(tmp_path, la_root)
    argv = run_args(la_data_dir, train_list, tmp_path / "model", "cli_mt", iters=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv += ["--tune_malloc", "1"]
    proc = subprocess.run([sys.executable, "train_LA_mt.py", *argv], cwd=CODE_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "model" / "cli_mt"
    assert {"log.txt", "config.json", "train_state.pth", "iter_2.pth"} <= {p.name for p in out.iterdir()}
    assert "save model to" in proc.stdout and "mallopt not available" not in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["specialist"] == "mt" and cfg["vnet"]["n_filters"] == 4 and len(cfg["cases"]) == N_CASES
    net = VNet(**cfg["vnet"])
    net.load_state_dict(torch.load(out / "iter_2.pth", weights_only=True), strict=True)


def test_config_round_trip():
    cfg = TrainConfig(patch_size=(32, 32, 16), generalist=["a.pth"], generalist_term="semisam").validate()
    d = json.loads(json.dumps(cfg.to_dict()))
    from training.config import config_from_dict
    back = config_from_dict(d)
    assert back.patch_size == (32, 32, 16) and back.generalist == ["a.pth"] and back.to_dict() == cfg.to_dict()



def test_hugepage_malloc_environment_rules(monkeypatch):
    from training.run import hugepage_malloc_env
    monkeypatch.setattr(sys, "platform", "linux")
    env = hugepage_malloc_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "SEMISAM_NO_REEXEC": "1"}
    merged = hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None   # the user's choice
    assert hugepage_malloc_env({"SEMISAM_NO_REEXEC": "1"}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hugepage_malloc_env({}) is None


def test_entry_script_restarts_once_with_hugepage_malloc_and_keeps_its_arguments(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(CODE_DIR)!r})\n"
        "import training.run as run\n"
        "run.main = lambda defaults, argv: print('RUN', os.environ.get('GLIBC_TUNABLES'), defaults, argv)\n"
        "run.run_script({'exp': 'x'})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SEMISAM_NO_REEXEC")}
    out = subprocess.run([sys.executable, str(script), "--seed", "3"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["RUN glibc.malloc.hugetlb=1 {'exp': 'x'} ['--seed', '3']"]
    kept = subprocess.run([sys.executable, str(script)], env=dict(env, SEMISAM_NO_REEXEC="1"),
                          capture_output=True, text=True, timeout=120)
    assert kept.stdout.splitlines() == ["RUN None {'exp': 'x'} []"]
