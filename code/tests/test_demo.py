"""The one-command demo (demo.py, `make demo`, over training.demo_recipe): end to end in --quick mode with every
path in tmp_path.

The quick setting trains for 3 iterations, so its metrics mean nothing; these tests check that every stage
runs and connects (MT, SemiSAM and SemiSAM+), that phantoms and the demo generalist are cached and reused, that
the generalist is chosen as documented (official, shipped, pretrained, given), that the generalist's quality and
the comparison are reported honestly, and that the Makefile's targets run the commands the README promises.
Every run names a --shipped_generalist in tmp_path, so a generalist released into the repository later does not
change what these tests exercise.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import struct
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import demo
from dataloaders import phantoms
from dataloaders.la_heart import load_case, read_list
from networks.sam_med3d import random_generalist
from tests.test_pretrain_generalist import TINY
from training import demo_recipe as recipe
from training.config import parse_config
from training.pretrain import checkpoint_status, config_json_path, pretrain
from utils.compare import ComparisonError, crop_box, paired_comparison
from utils.report import side_by_side, text_table
from utils.runtime import default_threads

REPO = Path(demo.__file__).resolve().parent.parent


def quick_argv(root: Path, *extra: str) -> list[str]:
    return ["--quick", "--out", str(root / "model"), "--data_root", str(root / "data"), "--ckpt_dir",
            str(root / "ckpt"), "--shipped_generalist", str(root / "released" / "demo_generalist.pth"),
            "--no_progress", "--threads", "1", *extra]


def tiny_generalist(path: Path, seed: int = 5) -> Path:
    """A tiny generalist (the golden fixture's architecture, img 32: the quick patch fits) in the official format
    ({'model_state_dict'}), its architecture JSON beside it as pretrain_generalist.py writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": random_generalist(TINY, seed).state_dict()}, path)
    config_json_path(path).write_text(json.dumps(TINY))
    return path


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def exp_dirs(root: Path) -> dict:
    return {name: root / "model" / fields["exp"] for name, fields in recipe.METHODS.items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first quick run, with progress on and stdout not a terminal (as under `make demo | tee` or CI)."""
    root = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = demo.main([a for a in quick_argv(root) if a != "--no_progress"])
    gen = root / "ckpt" / recipe.CACHE[True][1]
    h5 = root / "data" / "phantoms_quick" / "2018LA_Seg_Training Set" / "PHANTOM_000" / "mri_norm2.h5"
    return root, summary, gen.stat().st_mtime_ns, h5.stat().st_mtime_ns, stdout.getvalue()


def test_quick_demo_shows_progress_of_every_long_stage_when_not_on_a_terminal(first_run):
    out = first_run[4]
    assert "\x1b" not in out and "\r" not in out             # plain lines, no redrawn bar
    assert "[demo] machine: " in out and "thread(s) on cpu" in out
    assert "[phantoms] 6/6 (100%)" in out
    # no official and no shipped generalist: said in one line, then the demo generalist is pretrained
    (missing,) = [l for l in out.splitlines() if "no shipped demo generalist" in l]
    assert missing.startswith("[demo] generalist: no ")
    assert "demo_generalist.pth: pretraining the demo generalist here (3 iterations in 2 stages" in missing
    assert "[pretrain generalist] 2/2 (100%)  loss " in out and "ETA 0:00:00" in out
    assert "[pretrain generalist] 1/1 (100%)  loss " in out
    assert ("[demo] Generalist quality on 2 test case(s): with 10 clicks from the ground truth, in the 32x32x32 "
            "crop of a training patch around the target, it reaches Dice ") in out
    for exp in ("mt", "semisam_mt", "semisam_plus"):
        line = next(l for l in out.splitlines() if l.startswith(f"[train {exp}] 3/3 (100%)"))
        assert "  loss " in line and "  elapsed " in line and "  ETA " in line
    for name in recipe.METHODS:
        assert f"[evaluate {name}] case 1/2 PHANTOM_004: Dice " in out and f"[evaluate {name}] case 2/2" in out
    assert "depend on the CPU" in out
    # the side-by-side table, then one paired verdict per generalist method, then the generalist's quality
    header = next(l for l in out.splitlines() if l.startswith("metric "))
    assert header.split() == ["metric", "MT", "SemiSAM", "SemiSAM+"]
    for name in ("SemiSAM", "SemiSAM+"):
        assert any(l.startswith(f"{name} ") and " MT on Dice: " in l for l in out.splitlines()), name
    (verdict,) = [l for l in out.splitlines() if l.startswith("[demo] Verdict: ")]
    assert "with 10 clicks from the ground truth (zero-shot)" in verdict and "prompted from MT's predictions" in verdict
    assert "SemiSAM +" in verdict or "SemiSAM -" in verdict
    assert "SemiSAM+ " in verdict and verdict.count(" noise (two standard errors: ") == 2


def test_quick_demo_reports_every_method_with_finite_metrics(first_run):
    root, summary = first_run[:2]
    assert summary["data"]["kind"] == "phantoms" and summary["data"]["action"] == "written"
    assert summary["generalist"]["kind"] == "demo" and summary["generalist"]["action"] == "trained"
    assert summary["distance_unit"] == "voxels"
    assert list(summary["results"]) == ["MT", "SemiSAM", "SemiSAM+"]
    for label in ("MT", "SemiSAM", "SemiSAM+"):
        r = summary["results"][label]
        assert len(r["cases"]) == 2 == summary["n_test_cases"]
        for key in ("dice", "jaccard", "hd95", "asd"):
            assert math.isfinite(r["mean"][key]) and math.isfinite(r["std"][key]), (label, key)
        assert 0.0 <= r["mean"]["dice"] <= 1.0
        assert Path(r["checkpoint"]).name == "iter_3.pth" and Path(r["checkpoint"]).is_file()
    # every method ran through the engine with the same settings; only SemiSAM and SemiSAM+ had a generalist
    cfg = {label: json.loads((exp / "config.json").read_text()) for label, exp in exp_dirs(root).items()}
    assert cfg["MT"]["generalist"] == [] and cfg["SemiSAM"]["generalist"] == [summary["generalist"]["path"]]
    assert cfg["SemiSAM"]["generalist_term"] == "semisam" and cfg["SemiSAM"]["prompt"] == "point"
    assert cfg["SemiSAM+"]["generalist"] == [summary["generalist"]["path"]]
    assert cfg["SemiSAM+"]["generalist_term"] == "semisam_plus" and cfg["SemiSAM+"]["prompt"] == "unc"
    for key in ("seed", "labeled_num", "patch_size", "max_iterations", "n_filters", "batch_size", "lr_step",
                "rampup_block"):
        assert cfg["MT"][key] == cfg["SemiSAM"][key] == cfg["SemiSAM+"][key], key
    # the written summary is the returned one, and the markdown carries the table and the verdict
    on_disk = json.loads((root / "model" / "summary.json").read_text())
    assert on_disk["comparisons"] == summary["comparisons"]
    assert on_disk["results"]["SemiSAM"]["mean"] == summary["results"]["SemiSAM"]["mean"]
    md = (root / "model" / "summary.md").read_text()
    assert [(c["base"], c["other"]) for c in summary["comparisons"]] == [("MT", "SemiSAM"), ("MT", "SemiSAM+")]
    for c in summary["comparisons"]:
        assert c["statement"] in md and isinstance(c["beyond_noise"], bool)
    assert "HD95 (voxels)" in md and "| metric | MT | SemiSAM | SemiSAM+ |" in " ".join(md.split())
    # how good the generalist is here: zero-shot from the ground truth, and prompted from MT's predictions
    quality = summary["generalist_quality"]
    zero = quality["zero_shot"]
    assert zero["num_clicks"] == 10 and zero["crop"] == [32, 32, 32] and zero["summary"]["n"] == 2
    assert [c["case"] for c in zero["cases"]] == ["PHANTOM_004", "PHANTOM_005"]
    assert all(0.0 <= c["dice"] <= 1.0 for c in zero["cases"])
    assert quality["prompted_from_baseline"] == summary["figure"]["check"]["MT"]
    assert zero["statement"] in md and summary["verdict"] in md and on_disk["verdict"] == summary["verdict"]
    assert f"Dice {zero['summary']['dice_mean']:.1f} % with 10 clicks" in summary["verdict"]
    # where the numbers came from, and that they depend on it
    for key in ("platform", "cpu", "cpu_count", "usable_cores", "torch", "torch_threads"):
        assert summary["machine"][key], key
    assert summary["machine"]["cpu"] in md and "depend on the CPU" in md and "--threads 1 --channels_last 0" in md
    assert set(summary["wall_seconds"]) >= {"data", "generalist", "generalist quality", "train MT", "train SemiSAM",
                                            "train SemiSAM+", "evaluate SemiSAM+", "total"}


def test_quick_demo_writes_a_figure(first_run):
    root, summary = first_run[:2]
    png = root / "model" / "demo.png"
    assert Path(summary["figure"]["path"]) == png
    width, height = png_size(png)
    # 1 case x 2 slices, 8 columns (image, GT, MT, SemiSAM, SemiSAM+, SAM <- each of the three)
    assert width >= 1300 and height >= 300
    assert png.stat().st_size > 20_000
    panels = summary["figure"]["sam_panels"]
    assert [p["prompted_by"] for p in panels] == ["MT", "SemiSAM", "SemiSAM+"]
    for p in panels:
        assert 0.0 <= p["sam_dice_in_crop"] <= 1.0
        assert [b - a for a, b in p["crop"]] == [32, 32, 32]   # the training patch, inside the 48x48x32 volume
    check = summary["figure"]["check"]
    for label in ("MT", "SemiSAM", "SemiSAM+"):
        assert check[label]["n_cases"] == 2 and 0 <= check[label]["sam_dice"] <= 100
    assert check["statement"].startswith("Generalist check on 2 test case(s)")
    assert check["statement"] in (root / "model" / "summary.md").read_text()


def test_phantoms_are_written_in_the_la_layout(first_run):
    root = first_run[0]
    base = root / "data" / "phantoms_quick"
    train, test = read_list(base / "train.list"), read_list(base / "test.list")
    assert train == [f"PHANTOM_{i:03d}" for i in range(4)] and test == ["PHANTOM_004", "PHANTOM_005"]
    image, label = load_case(base / "2018LA_Seg_Training Set", "PHANTOM_004")
    assert image.shape == label.shape == (48, 48, 32)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and 0 < label.mean() < 0.5
    with h5py.File(base / "2018LA_Seg_Training Set" / "PHANTOM_000" / "mri_norm2.h5") as f:
        assert set(f.keys()) == {"image", "label"}


def test_second_run_reuses_phantoms_and_generalist_and_repeats_the_numbers(first_run):
    root, first, gen_mtime, h5_mtime, _ = first_run
    again = demo.main(quick_argv(root))
    gen = root / "ckpt" / recipe.CACHE[True][1]
    h5 = root / "data" / "phantoms_quick" / "2018LA_Seg_Training Set" / "PHANTOM_000" / "mri_norm2.h5"
    assert again["generalist"]["action"] == "reused" and gen.stat().st_mtime_ns == gen_mtime
    assert again["data"]["action"] == "reused" and h5.stat().st_mtime_ns == h5_mtime
    # same seed, same machine, same thread count: the same numbers
    def scores(summary, label):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in summary["results"][label]["cases"]]
    for label in ("MT", "SemiSAM", "SemiSAM+"):
        assert scores(again, label) == scores(first, label)
    assert again["generalist_quality"]["zero_shot"]["cases"] == first["generalist_quality"]["zero_shot"]["cases"]


def test_changed_phantom_settings_rewrite_the_phantoms(tmp_path):
    data = tmp_path / "data"
    s = demo.settings_from(demo.parse_args(["--quick", "--data_root", str(data)]))
    assert recipe.prepare_data(data, s, quick=True, progress=False)["action"] == "written"
    assert recipe.prepare_data(data, s, quick=True, progress=False)["action"] == "reused"
    s2 = dict(s, phantom_seed=1)
    assert recipe.prepare_data(data, s2, quick=True, progress=False)["action"] == "written"
    assert json.loads((data / "phantoms_quick" / phantoms.MANIFEST).read_text())["seed"] == 1


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core runner a second spinning thread slows these small models down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def choose(choice: str, tmp_path: Path, s: dict, messages: list | None = None, **kw) -> dict:
    """recipe.prepare_generalist as demo.py calls it, with every path in tmp_path (nothing is pretrained unless
    the pretraining branch is taken without skip_pretrain)."""
    return recipe.prepare_generalist(choice, s, ckpt_dir=tmp_path / "ckpt", shipped=tmp_path / "released" / "g.pth",
                                     quick=True, device="cpu", progress=False,
                                     say=(messages if messages is not None else []).append, **kw)


def test_pretrain_stages_are_the_shipped_recipe_and_scale():
    s = demo.settings_from(demo.parse_args([]))
    full = recipe.pretrain_configs(s, "ck", False, "cpu", progress=False)
    # stage 1: the first 5000 iterations of a 12000-iteration cosine schedule, 5 clicks; stage 2 from it, 10 clicks
    assert [(c.iterations, c.stop_at, c.warmup, c.num_clicks, c.lr, c.seed, c.batch_size, c.targets_per_image)
            for c in full] == [(12000, 5000, 200, 5, 8e-4, 1337, 2, 4), (2500, None, 50, 10, 4e-4, 1338, 2, 4)]
    assert full[0].init is None and full[1].init == full[0].out == str(Path("ck") / "demo_generalist_stage1.pth")
    assert full[1].out == str(Path("ck") / "demo_generalist.pth") and {c.arch for c in full} == {recipe.DEMO_ARCH}
    half = recipe.pretrain_configs(dict(s, pretrain_scale=0.5), "ck", False, "cpu", progress=False)
    assert [(c.iterations, c.stop_at, c.warmup) for c in half] == [(6000, 2500, 100), (1250, None, 25)]
    quick = recipe.pretrain_configs(demo.settings_from(demo.parse_args(["--quick"])), "ck", True, "cpu", False)
    assert [(c.iterations, c.stop_at) for c in quick] == [(5, 2), (1, None)]
    assert quick[1].out == str(Path("ck") / "demo_generalist_quick.pth")
    with pytest.raises(recipe.RecipeError, match="--pretrain_scale must be > 0"):
        demo.settings_from(demo.parse_args(["--pretrain_scale", "0"]))


def test_generalist_stages_cache_status_and_resume(tmp_path, one_thread):
    s = demo.settings_from(demo.parse_args(["--quick"]))
    first, last = recipe.pretrain_configs(s, tmp_path / "ckpt", True, "cpu", progress=False)
    assert checkpoint_status(first.out, first)[0] == "missing"
    with pytest.raises(recipe.RecipeError, match="skip_pretrain.*does not exist"):
        choose("auto", tmp_path, s, skip_pretrain=True)
    # an interrupted stage 1 (stopped after 1 of its 2 iterations) is resumed, not restarted; then stage 2 runs
    pretrain(dataclasses.replace(first, stop_at=1))
    status, reason = checkpoint_status(first.out, first)
    assert status == "partial" and "iteration 1 of 2" in reason
    said = []
    info = choose("auto", tmp_path, s, said)
    assert [stage["action"] for stage in info["stages"]] == ["resumed", "trained"] and info["kind"] == "demo"
    assert info["path"] == last.out and info["pretrain_iterations"] == 3
    assert any(m.startswith("generalist: stage 1/2: ") and "resuming" in m for m in said)
    assert torch.load(first.out, weights_only=True)["iteration"] == 2      # stopped where stage 1 stops
    second = torch.load(last.out, weights_only=True)
    assert second["iteration"] == 1 and second["train_args"]["init"] == first.out
    assert [checkpoint_status(c.out, c)[0] for c in (first, last)] == ["done", "done"]
    assert [stage["action"] for stage in choose("auto", tmp_path, s)["stages"]] == ["reused", "reused"]
    # other settings: not the demo's model
    status, reason = checkpoint_status(last.out, dataclasses.replace(last, num_clicks=3))
    assert status == "mismatch" and "num_clicks 10 (want 3)" in reason
    # --skip_pretrain takes the file as it is and reports what it really holds
    info = choose("pretrain", tmp_path, dict(s, pretrain_scale=0.5), skip_pretrain=True)
    assert info["action"] == "used as is" and info["final_stage_iteration"] == 1
    assert info["pretrain_iterations"] is None
    Path(last.out).write_bytes(b"not a checkpoint")
    assert checkpoint_status(last.out, last)[0] == "mismatch"


def test_generalist_choice_official_then_shipped_then_pretrained(tmp_path):
    s = demo.settings_from(demo.parse_args(["--quick"]))
    # neither official nor shipped: one line says the shipped one is missing, then the pretraining branch
    said = []
    with pytest.raises(recipe.RecipeError, match="skip_pretrain"):
        choose("auto", tmp_path, s, said, skip_pretrain=True)
    assert len(said) == 1 and "no shipped demo generalist" in said[0] and str(tmp_path / "released" / "g.pth") in said[0]
    # the shipped one (its architecture JSON beside it) when present
    shipped = tiny_generalist(tmp_path / "released" / "g.pth")
    info = choose("auto", tmp_path, s)
    assert info == dict(path=str(shipped), arch=str(shipped.with_suffix(".json")), kind="shipped demo", action="found")
    # the official checkpoint wins over it
    official = tiny_generalist(tmp_path / "ckpt" / recipe.OFFICIAL_NAME)
    info = choose("auto", tmp_path, s)
    assert info["path"] == str(official) and info["kind"] == "SAM-Med3D" and info["arch"] == "vit_b_ori"
    # --generalist pretrain ignores both and goes to the recipe's own pretraining
    with pytest.raises(recipe.RecipeError, match="skip_pretrain: .*demo_generalist_quick.pth"):
        choose("pretrain", tmp_path, s, skip_pretrain=True)
    # a shipped checkpoint without its architecture is refused, not guessed
    official.unlink()
    shipped.with_suffix(".json").unlink()
    with pytest.raises(recipe.RecipeError, match="shipped demo generalist .*g.pth has no architecture file"):
        choose("auto", tmp_path, s)
    assert recipe.SHIPPED_GENERALIST == "../model/released/demo_generalist.pth"
    assert demo.parse_args([]).shipped_generalist.endswith("model/released/demo_generalist.pth")


def test_quick_demo_with_the_shipped_generalist(first_run, tmp_path):
    root = first_run[0]
    shipped = tiny_generalist(tmp_path / "released" / "demo_generalist.pth")
    summary = demo.main(["--quick", "--out", str(tmp_path / "model"), "--data_root", str(root / "data"), "--ckpt_dir",
                         str(root / "ckpt"), "--shipped_generalist", str(shipped), "--no_progress", "--threads", "1"])
    assert summary["generalist"] == dict(path=str(shipped), arch=str(shipped.with_suffix(".json")),
                                         kind="shipped demo", action="found")
    for exp in ("semisam_mt", "semisam_plus"):
        cfg = json.loads((tmp_path / "model" / exp / "config.json").read_text())
        assert cfg["generalist"] == [str(shipped)] and cfg["generalist_arch"] == str(shipped.with_suffix(".json"))
    assert summary["generalist_quality"]["zero_shot"]["summary"]["n"] == 2
    assert "**shipped demo**" in (tmp_path / "model" / "summary.md").read_text()


def test_explicit_generalist_path_must_exist(tmp_path):
    s = demo.settings_from(demo.parse_args([]))
    with pytest.raises(recipe.RecipeError, match="nope.pth: checkpoint not found"):
        choose(str(tmp_path / "nope.pth"), tmp_path, s)
    given = tiny_generalist(tmp_path / "mine.pth")
    assert choose(str(given), tmp_path, s, arch="a.json") == dict(path=str(given), arch="a.json", kind="given",
                                                                action="given")


def test_real_la_data_is_used_when_present(la_root, tmp_path):
    s = demo.settings_from(demo.parse_args([]))
    data = recipe.prepare_data(la_root, s, say=lambda m: None)
    assert data["kind"] == "LA" and data["action"] == "found" and data["spacing"] == [0.625] * 3
    assert Path(data["root_path"]) == la_root / "2018LA_Seg_Training Set"
    with pytest.raises(recipe.RecipeError, match="--data la: expected .*2018LA_Seg_Training Set"):
        recipe.prepare_data(tmp_path, s, choice="la")


def test_settings_presets_flags_and_errors():
    quick = demo.settings_from(demo.parse_args(["--quick", "--iterations", "5"]))
    assert quick["iterations"] == 5 and quick["patch_size"] == (32, 32, 32)
    full = demo.settings_from(demo.parse_args(["--patch_size", "48", "48", "32"]))
    assert full["patch_size"] == (48, 48, 32) and full["iterations"] == 600
    assert full["iterations"] == recipe.DEFAULTS["iterations"]
    with pytest.raises(recipe.RecipeError, match="--patch_size .*multiple of 16"):
        demo.settings_from(demo.parse_args(["--patch_size", "40", "48", "32"]))
    with pytest.raises(recipe.RecipeError, match="--labeled_bs 4 must be < --batch_size 4"):
        demo.settings_from(demo.parse_args(["--labeled_bs", "4"]))
    with pytest.raises(recipe.RecipeError, match="--iterations must be >= 1"):
        demo.settings_from(demo.parse_args(["--iterations", "0"]))
    assert recipe.schedule(6000) == {"lr_step": 2500, "rampup_block": 150}
    assert recipe.schedule(300) == {"lr_step": 125, "rampup_block": 8}
    assert recipe.schedule(600) == {"lr_step": 250, "rampup_block": 15}
    assert default_threads(3) == 3 and 1 <= default_threads(0) <= (os.cpu_count() or 1)
    assert demo.settings_from(demo.parse_args(["--max_test_cases", "0"]))["max_test_cases"] == 0
    with pytest.raises(recipe.RecipeError, match="--base_lr must be > 0"):
        demo.settings_from(demo.parse_args(["--base_lr", "0"]))


def _records(dices):
    return {"mean": {"dice": float(np.mean(dices))}, "cases": [{"case": f"c{i}", "dice": d} for i, d in enumerate(dices)]}


def test_compare_says_what_happened():
    mt = _records([0.80, 0.70, 0.75, 0.85])
    better = paired_comparison(mt, _records([0.90, 0.80, 0.85, 0.95]), "MT", "SemiSAM")
    assert better["other_beat_base"] and better["statement"].startswith("SemiSAM beat MT on Dice: 87.50 % vs 77.50 %")
    assert "higher on 4 and lower on 0 of 4" in better["statement"] and "exceeds two standard errors" in better["statement"]
    worse = paired_comparison(mt, _records([0.79, 0.71, 0.70, 0.84]), "MT", "SemiSAM")
    assert not worse["other_beat_base"] and worse["statement"].startswith("SemiSAM did not beat MT")
    assert worse["dice_difference_points"] == pytest.approx(-1.5)
    assert "does not show a real difference" in worse["statement"]
    with pytest.raises(ComparisonError, match="MT and SemiSAM\\+ were evaluated on different cases"):
        paired_comparison(mt, _records([0.9, 0.9]), "MT", "SemiSAM+")
    plus = paired_comparison(mt, _records([0.90, 0.80, 0.85, 0.95]), "MT", "SemiSAM+")
    assert plus["statement"].startswith("SemiSAM+ beat MT on Dice")


def test_crop_box_is_centred_and_inside_the_volume():
    mask = np.zeros((96, 96, 64), np.uint8)
    mask[70:90, 10:20, 30:34] = 1
    box = crop_box(mask, (64, 64, 48))
    assert box == ((32, 96), (0, 64), (8, 56))
    assert crop_box(np.zeros((40, 96, 64)), (64, 64, 48)) == ((0, 40), (16, 80), (8, 56))


def test_side_by_side_table_has_one_column_per_method_in_order():
    results = {name: {"mean": {"dice": 0.8 + i / 100, "jaccard": 0.7, "hd95": 3.25, "asd": 1.0},
                      "std": {"dice": 0.05, "jaccard": 0.04, "hd95": 0.5, "asd": 0.25}}
               for i, name in enumerate(["MT", "SemiSAM", "SemiSAM+"])}
    header, rows = side_by_side(results, "voxels")
    assert header == ["metric", "MT", "SemiSAM", "SemiSAM+"]
    assert rows[0] == ["Dice (%)", "80.00 ± 5.00", "81.00 ± 5.00", "82.00 ± 5.00"]
    assert rows[2] == ["HD95 (voxels)", "3.25 ± 0.50", "3.25 ± 0.50", "3.25 ± 0.50"]
    assert [r[0] for r in rows] == ["Dice (%)", "Jaccard (%)", "HD95 (voxels)", "ASD (voxels)"]
    lines = text_table(header, rows).splitlines()
    assert lines[0].split() == ["metric", "MT", "SemiSAM", "SemiSAM+"] and set(lines[1]) == {"-"}


def test_methods_share_every_setting_but_their_own(tmp_path):
    s = demo.settings_from(demo.parse_args(["--quick"]))
    data = dict(root_path=str(tmp_path / "cases"), train_list=str(tmp_path / "train.list"), kind="phantoms")
    generalist = dict(path="g.pth", arch="g.json")
    assert list(recipe.METHODS) == ["MT", "SemiSAM", "SemiSAM+"] and recipe.BASELINE == "MT"
    assert recipe.METHODS["SemiSAM+"] == dict(exp="semisam_plus", specialist="mt", generalist_term="semisam_plus",
                                              prompt="unc")
    cfgs = {name: recipe.train_config(name, s, data, generalist, model_dir=tmp_path, device="cpu",
                                      channels_last=False)
            for name in recipe.METHODS}
    method_fields = {"exp", "generalist_term", "generalist", "generalist_arch", "prompt", "num_clicks",
                     "sam_weight"}
    base = {k: v for k, v in dataclasses.asdict(cfgs["MT"]).items() if k not in method_fields}
    for name, cfg in cfgs.items():
        assert {k: v for k, v in dataclasses.asdict(cfg).items() if k not in method_fields} == base, name
        # run.main(fields, []) rebuilds exactly this config: nothing is lost on the way to the trainer
        assert parse_config(dataclasses.asdict(cfg), []) == cfg
    assert cfgs["MT"].generalist == [] and cfgs["SemiSAM+"].generalist == ["g.pth"]
    assert cfgs["SemiSAM+"].prompt == "unc" and cfgs["SemiSAM"].num_clicks == s["num_clicks"]
    assert base["channels_last"] is False and base["max_iterations"] == 3 and base["lr_step"] == 1
    assert base["overwrite"] is True and base["model_dir"] == str(tmp_path)
    # a caller (the study) may continue a run instead; MT needs no generalist, the others do
    resumed = recipe.train_config("MT", s, data, None, model_dir=tmp_path, device="cpu", overwrite=False, resume="auto")
    assert resumed.resume == "auto" and not resumed.overwrite
    with pytest.raises(recipe.RecipeError, match="SemiSAM needs a generalist"):
        recipe.train_config("SemiSAM", s, data, None, model_dir=tmp_path, device="cpu")


def test_an_interrupted_phantom_write_is_rewritten(tmp_path):
    out = tmp_path / "ph"
    assert phantoms.ensure_phantom_dataset(out, 1, 1, (24, 24, 24), 0) == "written"
    assert phantoms.ensure_phantom_dataset(out, 1, 1, (24, 24, 24), 0) == "reused"
    (out / "2018LA_Seg_Training Set" / "PHANTOM_001" / "mri_norm2.h5").unlink()
    assert phantoms.ensure_phantom_dataset(out, 1, 1, (24, 24, 24), 0) == "written"
    (out / phantoms.MANIFEST).unlink()        # what a crash during the write leaves
    assert phantoms.ensure_phantom_dataset(out, 1, 1, (24, 24, 24), 0) == "written"


def _make(*args: str, venv: Path | None = None) -> str:
    # a clean environment: under `make test` the parent make's MAKELEVEL/MAKEFLAGS would add directory lines,
    # and variables of the Makefile set in the environment would change its defaults
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "PYTHON", "VENV", "DEMO_ARGS", "TEST_ARGS")}
    cmd = ["make", "-n", *args] + ([f"VENV={venv}"] if venv else [])
    return subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout


def test_makefile_demo_and_test_targets(tmp_path):
    lines = _make("demo", venv=tmp_path / "venv").splitlines()
    py = f"{tmp_path / 'venv'}/bin/python"
    # a missing venv is created and filled first, then the demo runs from code/
    assert lines == [f"test -x {py} || python3 -m venv {tmp_path / 'venv'}", f"{py} -m pip install -r requirements.txt",
                     f"touch {tmp_path / 'venv'}/.requirements-installed", f"cd code && {py} demo.py "]
    assert _make("demo", "DEMO_ARGS=--quick", venv=tmp_path / "venv").splitlines()[-1].endswith("demo.py --quick")
    # the README's test command, skip reasons shown
    assert _make("test", venv=tmp_path / "venv").splitlines()[-1] == f"cd code && {py} -m pytest tests -q -ra"
    # an installed venv (stamp newer than requirements.txt) is not touched again
    (tmp_path / "venv").mkdir()
    stamp = tmp_path / "venv" / ".requirements-installed"
    stamp.touch()
    later = (REPO / "requirements.txt").stat().st_mtime + 10
    os.utime(stamp, (later, later))
    assert _make("demo", venv=tmp_path / "venv").splitlines() == [f"cd code && {py} demo.py "]


def test_quick_demo_on_the_real_la_data(first_run, la_root, tmp_path):
    root = first_run[0]
    summary = demo.main(["--quick", "--data_root", str(la_root), "--out", str(tmp_path / "model"), "--ckpt_dir",
                         str(root / "ckpt"), "--shipped_generalist", str(tmp_path / "none.pth"), "--max_test_cases", "1", "--stride_xy", "32", "--stride_z", "32",
                         "--no_progress", "--threads", "1"])
    assert summary["data"]["kind"] == "LA" and summary["generalist"]["action"] == "reused"
    assert summary["distance_unit"] == "mm" and summary["n_test_cases"] == 1
    first_test_case = read_list(la_root / "test.list")[0]
    for label in ("MT", "SemiSAM", "SemiSAM+"):
        (case,) = summary["results"][label]["cases"]
        assert case["case"] == first_test_case and all(math.isfinite(case[k]) for k in ("dice", "hd95", "asd"))
    assert "HD95 (mm)" in (tmp_path / "model" / "summary.md").read_text()
    assert png_size(tmp_path / "model" / "demo.png")[0] >= 1000


def test_channels_last_flag_reaches_every_training_run(first_run):
    # last in this file: it rewrites first_run's model folder
    root = first_run[0]
    demo.main(quick_argv(root, "--channels_last", "0"))
    for exp in exp_dirs(root).values():
        assert json.loads((exp / "config.json").read_text())["channels_last"] is False
    demo.main(quick_argv(root))
    for exp in exp_dirs(root).values():
        assert json.loads((exp / "config.json").read_text())["channels_last"] is None
