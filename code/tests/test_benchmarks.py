"""Smoke tests of the benchmarks (code/benchmarks/) on tiny settings: they run the real engine, networks and
data, and check that the reported numbers are consistent (sections inside the step, spreads ordered, paths
agreeing), not how fast anything is."""
import json
import math
import mmap
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_clicks, bench_encoder, bench_inference, bench_step, gpu_smoke
from benchmarks import common as C
from tests.conftest import cpu_training_amp
from utils.bf16 import bf16_supported
from dataloaders.layout import TRAINING_FOLDER
from utils.metrics import binary_dice
from utils.report import markdown_table

BENCH_DIR = Path(bench_step.__file__).resolve().parent
TINY_STEP = ["--patch_size", "32", "32", "16", "--batch_size", "2", "--labeled_bs", "1", "--n_filters", "4",
             "--generalist_arch", "vit_tiny_demo", "--num_clicks", "2", "--steps", "2", "--warmup", "1",
             "--threads", "1"]
# runs inside the pytest process must not change its malloc behaviour (the workers are processes of their own)
KEEP_MALLOC = ["--tune_malloc", "0"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A benchmark's --threads sets torch's thread count for the whole process; later tests must get theirs
    back (e.g. test_generalist's batch-invariance check depends on it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ common
def test_spread_ratio_dice_and_table():
    assert C.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    with pytest.raises(C.BenchmarkError, match="no measurements"):
        C.spread([])
    assert C.ratio(3.0, 1.5) == 2.0 and C.ratio(1.0, 0.0) is None
    a = torch.tensor([1, 1, 0, 0])
    assert binary_dice(a, torch.tensor([1, 0, 1, 0])) == 0.5
    assert binary_dice(torch.zeros(3), torch.zeros(3)) == 1.0
    table = markdown_table(["name", "value"], [["a", "1"], ["bbb", "22"]]).splitlines()
    assert table[0] == "| name | value |" and table[1] == "|------|------:|" and table[3] == "| bbb  |    22 |"
    assert C.fmt_seconds(0.0123) == "12.3 ms" and C.fmt_seconds(2.5) == "2.50 s"


def test_peak_rss_reset_measures_only_what_follows():
    big = mmap.mmap(-1, 256 * 2**20)      # 256 MiB peak before the reset, returned to the OS on close
    for offset in range(0, len(big), 4096):
        big[offset] = 1
    big.close()
    before = C.process_peak_rss()
    assert before > 256 * 2**20
    if not C.reset_peak_rss():
        pytest.fail("/proc/self/clear_refs not writable: peak_rss_steps would be missing on this machine")
    block = torch.ones(16 * 2**20 // 4)   # 16 MiB touched after the reset
    since = C.peak_rss_since_reset()
    assert since is not None and block.numel() * 4 <= since < before - 128 * 2**20


def test_resolve_case_dir(la_root, la_data_dir, tmp_path, monkeypatch):
    assert C.resolve_case_dir(str(la_root)) == la_data_dir
    assert C.resolve_case_dir(str(la_data_dir)) == la_data_dir
    monkeypatch.setenv("LA_DATA_ROOT", str(la_root))
    assert C.resolve_case_dir(None) == la_data_dir
    with pytest.raises(FileNotFoundError, match=f"--root_path={tmp_path}.*train.list"):
        C.resolve_case_dir(str(tmp_path))
    monkeypatch.delenv("LA_DATA_ROOT")
    with pytest.raises(FileNotFoundError, match="--synthetic"):
        C.resolve_case_dir(None)


def test_generalist_sections_come_from_the_branch_timer():
    """The benchmarks time the generalist through the timer the branch accepts (nothing is replaced): the
    encoder once, click 1 once, then per click a prompt-encoder and a mask-decoder call, later clicks apart."""
    import contextlib
    import utils.clicks
    import utils.generalist as G
    seen = []

    @contextlib.contextmanager
    def timer(section):
        seen.append(section)
        yield

    model = C.random_sam("vit_tiny_demo", seed=0)
    images = torch.randn(1, 1, 32, 32, 32)
    prob = torch.zeros(1, 32, 32, 32)
    prob[0, 8:20, 8:20, 8:20] = 0.9
    G.GeneralistBranch([model], prompt="point", num_clicks=3, timer=timer)(images, prob)
    decode = ["generalist.prompt_encoder", "generalist.decoder"]
    assert seen == (["generalist.encoder", "generalist.first_click"] + decode
                    + ["generalist.clicks"] + decode + ["generalist.clicks"] + decode)
    assert set(seen) == set(G.TIMER_SECTIONS)
    assert G.next_clicks is utils.clicks.next_clicks


def test_random_sam_fills_zero_initialised_tables():
    model = C.random_sam("vit_tiny_demo", seed=3)
    rel = model.image_encoder.blocks[0].attn.rel_pos_d
    assert float(rel.abs().max()) > 0 and float(model.image_encoder.pos_embed.abs().max()) > 0
    assert not any(p.requires_grad for p in model.parameters())
    again = C.random_sam("vit_tiny_demo", seed=3)
    assert torch.equal(rel, again.image_encoder.blocks[0].attn.rel_pos_d)
    with pytest.raises(C.BenchmarkError, match="nor a JSON config"):
        C.random_sam("vit_nonexistent")


# ------------------------------------------------------------------------------------------ bench_step
@pytest.mark.parametrize("method,script", sorted(bench_step.METHOD_SCRIPTS.items()))
def test_method_presets_are_the_entry_scripts_settings(method, script):
    module = __import__(script)
    settings, n_generalists = bench_step.method_preset(method)
    assert settings["specialist"] == module.SPECIALIST
    assert settings["generalist_term"] == module.GENERALIST_TERM
    assert n_generalists == len(getattr(module, "GENERALIST", []))
    assert "patch_size" not in settings        # methods are compared at one patch size
    if n_generalists:
        assert settings["prompt"] == module.PROMPT and settings["num_clicks"] == module.NUM_CLICKS


def test_entries_and_bad_settings():
    assert bench_step.parse_entry("semisam:patch_size=128,128,128:amp=bf16") == (
        "semisam", ["--patch_size", "128", "128", "128", "--amp", "bf16"])
    assert bench_step.parse_entry("mt") == ("mt", [])
    with pytest.raises(C.BenchmarkError, match="METHOD\\[:key=value...\\], got 'amp'"):
        bench_step.parse_entry("mt:amp")
    with pytest.raises(C.BenchmarkError, match="method 'vnet' unknown; choose from"):
        bench_step.parse_entry("vnet")
    with pytest.raises(C.BenchmarkError, match="--steps >= 1"):
        bench_step.main(["--steps", "0"])


def test_step_compare_in_fresh_processes(la_root, tmp_path, monkeypatch):
    # the GPU image has no tensorboardX: any import of it in a worker must fail this test
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "tensorboardX.py").write_text("raise ImportError('tensorboardX must not be needed')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "step.json"
    payload = bench_step.main(["--compare", "mt", "semisam", "--root_path", str(la_root), *TINY_STEP,
                               "--json", str(out)])
    assert json.loads(out.read_text())["ratios_to_first"] == payload["ratios_to_first"]
    mt, sam = payload["results"]
    rel = payload["ratios_to_first"]
    assert rel["mt"] == {"wall": 1.0, "cpu": 1.0, "within_process": 1.0, "within_base": "mt"}
    assert rel["semisam"]["within_base"] == "mt"
    assert math.isclose(rel["semisam"]["wall"], sam["step"]["median"] / mt["step"]["median"])
    assert math.isclose(rel["semisam"]["cpu"], sam["cpu_step"]["median"] / mt["cpu_step"]["median"])
    shares = [s["total"] / (s["total"] - s["sections"]["generalist"]) for s in sam["per_step"]]
    assert math.isclose(rel["semisam"]["within_process"], statistics.median(shares)) and min(shares) > 1
    for r in (mt, sam):
        assert r["settings"]["patch_size"] == [32, 32, 16] and r["settings"]["n_filters"] == 4
        assert r["step"]["n"] == 2 and r["step"]["min"] <= r["step"]["median"] <= r["step"]["max"]
        assert set(r["cpu_sections"]) == set(r["sections"]) and r["cpu_step"]["median"] > 0
        assert {"data", "student_forward", "loss", "teacher", "backward", "optimizer", "ema", "other"} <= set(
            r["sections"])
        assert all(math.isfinite(v) for v in r["losses"])
        for step in r["per_step"]:     # sections never overlap: the rest of the step is >= 0
            top = sum(v for n, v in step["sections"].items() if "." not in n and n != "other")
            assert math.isclose(step["sections"]["other"], step["total"] - top, abs_tol=1e-9)
            assert step["sections"]["other"] >= 0
        mem = r["memory"]
        assert 0 < mem["peak_rss_steps"] <= mem["peak_rss_process"]
    assert "generalist" not in mt["sections"] and mt["generalist_weights"] == "none"
    gen = sam["sections"]
    assert gen["generalist.encoder"]["median"] > 0 and gen["generalist.decoder"]["median"] > 0
    assert gen["generalist.first_click"]["median"] > 0 and gen["generalist.clicks"]["median"] > 0
    for step in sam["per_step"]:
        assert step["sections"]["generalist.other"] >= 0     # the hooked parts lie inside 'generalist'
        assert isinstance(step["minor_faults"], int) and step["minor_faults"] >= 0
        assert isinstance(step["involuntary_switches"], int) and step["involuntary_switches"] >= 0
    assert sam["minor_faults"]["n"] == len(sam["per_step"])
    assert sam["generalist_weights"].startswith("random")


def test_step_rounds_pool_steps_and_ratios_need_comparable_settings(la_root):
    # patch depth 48: at 32 a V-Net level has depth 2, where bf16 training is refused (training/amp_check.py)
    amp = cpu_training_amp()     # bf16 where the CPU has it natively (refused elsewhere: utils.bf16)
    payload = bench_step.main(["--compare", "uamt", f"sup:amp={amp}", "--in_process", "--rounds", "2",
                               "--root_path", str(la_root), *TINY_STEP, "--patch_size", "48", "32", "16",
                               *KEEP_MALLOC, "--steps", "1",
                               "--uamt_passes", "2"])
    uamt, sup = payload["results"]
    assert uamt["rounds"] == 2 and uamt["step"]["n"] == 2 and len(uamt["loadavg"]) == 2
    assert uamt["settings"]["uamt_passes"] == 2 and sup["settings"]["amp"] == amp
    assert uamt["settings"]["tune_malloc"] is False
    assert uamt["sections"]["uncertainty"]["median"] > 0 and "teacher" not in sup["sections"]
    rel = payload["ratios_to_first"]
    # sup lacks the teacher: uamt is no base for it, nor it for uamt
    assert rel[f"sup:amp={amp}"]["within_base"] == f"sup:amp={amp}" and rel[f"sup:amp={amp}"]["within_process"] == 1.0
    assert rel["uamt"]["within_base"] == "uamt"
    assert bench_step.within_process_ratio(sup, uamt) is None


def test_enough_cases_for_every_method_script(tmp_path):
    # the GPU pass once carried a 12-case subset: MT and UA-MT label 16, so every step stage failed
    case_dir = tmp_path / TRAINING_FOLDER
    case_dir.mkdir()
    (tmp_path / "test.list").write_text("t0\n")
    (tmp_path / "train.list").write_text("".join(f"c{i}\n" for i in range(12)))
    with pytest.raises(C.BenchmarkError, match="12 training and 1 test cases.*at least 17 training cases"):
        bench_step.check_enough_cases(case_dir)
    # gpu_check.sh checks this before any stage (and before looking for a GPU)
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--root_path", str(tmp_path), "--out",
                           str(tmp_path / "out")], env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "at least 17 training cases" in proc.stdout + proc.stderr
    assert "+ " not in proc.stdout                      # no stage ran
    (tmp_path / "train.list").write_text("".join(f"c{i}\n" for i in range(17)))
    assert bench_step.check_enough_cases(case_dir) == (17, 1)
    (tmp_path / "test.list").unlink()
    with pytest.raises(C.BenchmarkError, match="17 training and 0 test cases"):
        bench_step.check_enough_cases(case_dir)


def test_step_reports_bad_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        bench_step.main(["--method", "mt", "--root_path", str(tmp_path / "nowhere")])


# ------------------------------------------------------------------------------------------ encoder
def test_encoder_paths_agree_and_branch_compares_precisions(la_root):
    payload = bench_encoder.main(["--arch", "vit_tiny_demo", "--batch", "1", "--steps", "1", "--warmup", "0",
                                  "--threads", "1", "--branch", "--root_path", str(la_root), "--patch", "48", "48",
                                  "32", "--num_clicks", "2", *KEEP_MALLOC])
    enc = payload["encoder"]
    assert set(enc["runs"]) == {"fp32/fast", "fp32/reference", "bf16/fast", "bf16/reference"}
    assert enc["per_precision"]["fp32"]["rel_max_abs_diff_fast_vs_reference"] < 1e-4
    assert enc["per_precision"]["bf16"]["rel_max_abs_diff_fast_vs_reference"] < 0.05
    assert enc["per_precision"]["fp32"]["speedup_fast_vs_reference"]["wall"] > 0
    assert all(run["wall"]["n"] == 1 and run["cpu"]["median"] > 0 for run in enc["runs"].values())
    assert enc["per_impl"]["fast"]["max_abs_diff_bf16_vs_fp32"] > 0      # bf16 really ran
    br = payload["branch"]
    assert 0 <= br["voxel_agreement_bf16_vs_fp32"] <= 1 and 0 <= br["dice_bf16_vs_fp32"] <= 1
    for run in br["runs"].values():
        assert run["mean_parts_s"]["generalist.encoder"] > 0 and run["mean_parts_s"]["generalist.decoder"] > 0


# ------------------------------------------------------------------------------------------ inference
def test_inference_fp32_vs_bf16_with_a_checkpoint(la_root, tmp_path):
    from networks.vnet import VNet
    ckpt = tmp_path / "iter_1.pth"
    torch.manual_seed(0)
    torch.save(VNet(n_filters=4, normalization="batchnorm").state_dict(), ckpt)
    out = tmp_path / "inf.json"
    payload = bench_inference.main(["--root_path", str(la_root), "--checkpoint", str(ckpt), "--patch", "64", "64",
                                    "48", "--stride_xy", "64", "--stride_z", "48", "--threads", "1", *KEEP_MALLOC,
                                    "--json", str(out)])
    assert json.loads(out.read_text())["windows"] == payload["windows"]
    shape = payload["volume_shape"]
    expected = 1
    for s, p, st in zip(shape, (64, 64, 48), (64, 64, 48)):
        expected *= math.ceil((max(s, p) - p) / st) + 1
    assert payload["windows"] == expected
    assert payload["weights"] == f"checkpoint {ckpt}" and payload["vnet"]["n_filters"] == 4
    assert 0 <= payload["dice_bf16_vs_fp32"] <= 1 and payload["speedup_bf16_vs_fp32"]["wall"] > 0
    assert 0 < payload["max_abs_score_diff"] < 1
    for run in payload["runs"].values():
        parts = run["parts_mean_s"]
        assert list(parts) == ["prepare", "windows", "forward", "accumulate", "finish"]
        assert all(v > 0 for v in parts.values())
        # the parts are the whole call: their sum is the mean volume time, up to the timer's overhead
        mean_wall = run["wall"]["median"]
        assert 0.5 * mean_wall < sum(parts.values()) <= 1.5 * run["wall"]["max"]
    assert payload["forward_speedup_bf16_vs_fp32"] > 0


def test_clicks_benchmark_times_every_mask_kind(la_root, tmp_path):
    out = bench_clicks.main(["--root_path", str(la_root), "--patch", "40", "32", "24", "--noise", "0.4",
                             "--steps", "2", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "c.json")])
    runs = out["clicks"]["runs"]
    kinds = ["label", "noise 0.4", "box + 5 % speckle"]
    assert list(runs) == [f"{k} / {c}" for k in kinds for c in ("first", "later")]
    assert json.loads((tmp_path / "c.json").read_text())["clicks"]["runs"].keys() == runs.keys()
    fractions = out["clicks"]["foreground_fraction"]
    assert 0 < fractions["label"] < 1 and abs(fractions["noise 0.4"] - 0.4) < 0.02
    assert abs(fractions["box + 5 % speckle"] - (0.75 ** 3 + 0.05 * (1 - 0.75 ** 3))) < 0.02
    for name, run in runs.items():
        assert run["wall"]["n"] == 2 and 0 < run["wall"]["min"] <= run["wall"]["median"] <= run["wall"]["max"]
        # every click lands on a false negative (the SAM masks here only miss foreground): label 1
        assert run["labels"] == [1, 1] and all(0 <= c < s for xyz in run["clicks"] for c, s in zip(xyz, (40, 32, 24)))
    masks = bench_clicks.label_masks(bench_clicks.C.resolve_case_dir(str(la_root)), 2, (40, 32, 24))
    for b, xyz in enumerate(runs["label / first"]["clicks"]):
        assert masks[b][tuple(xyz)]                 # the deepest voxel is inside the label
    for b, xyz in enumerate(runs["label / later"]["clicks"]):
        assert masks[b][tuple(xyz)] and xyz[0] < 20  # a missed voxel: in the half the SAM mask leaves out
    for bad in (["--steps", "0"], ["--batch", "0"], ["--warmup", "-1"]):
        with pytest.raises(C.BenchmarkError, match="need --steps >= 1, --warmup >= 0, --batch >= 1"):
            bench_clicks.main(["--synthetic", *bad])


def test_random_vnet_batchnorm_statistics_come_from_the_volume():
    image = torch.randn(40, 36, 20).mul(3).add(5).numpy()
    net = bench_inference.random_vnet(4, 0, image, (32, 32, 16), 2, torch.device("cpu"))
    bn = net.block_one.conv[1]
    assert not net.training and bn.momentum == 0.1
    assert float(bn.running_mean.abs().max()) > 0 and int(bn.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------------ gpu_check.sh
def _gpu_check_commands(tmp_path, *extra):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1")
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--synthetic", "--out", str(tmp_path), *extra],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line[2:].split() for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_gpu_check_commands_parse(tmp_path):
    from training.config import build_parser as training_parser
    commands = _gpu_check_commands(tmp_path)
    scripts = [next(a for a in cmd if a.startswith("benchmarks/")) for cmd in commands]
    assert scripts == (["benchmarks/gpu_smoke.py", "benchmarks/bench_step.py", "benchmarks/bench_inference.py",
                        "benchmarks/bench_encoder.py"] + ["benchmarks/bench_step.py"] * 4
                       + ["benchmarks/bench_inference.py", "benchmarks/bench_clicks.py"])
    for cmd, script in zip(commands, scripts):
        argv = cmd[cmd.index(script) + 1:]
        assert "--synthetic" in argv and ("cuda" in argv) != (cmd in commands[-3:-1])   # host CPU runs
        if script.endswith("bench_step.py"):
            args, train_argv = bench_step.build_parser().parse_known_args(argv)
            for entry in args.compare:
                method, extra = bench_step.parse_entry(entry)
                training_parser(bench_step.method_preset(method)[0]).parse_args(train_argv + extra)
        else:
            module = {"bench_encoder.py": bench_encoder, "bench_inference.py": bench_inference,
                      "gpu_smoke.py": gpu_smoke, "bench_clicks.py": bench_clicks}[Path(script).name]
            module.build_parser().parse_args(argv)
    # --only picks stages (to redo a failed one) and keeps their order
    only = _gpu_check_commands(tmp_path, "--only", "encoder,smoke")
    assert [next(a for a in cmd if a.startswith("benchmarks/")) for cmd in only] == [
        "benchmarks/gpu_smoke.py", "benchmarks/bench_encoder.py"]
    bad = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--bogus"],
                         env=dict(os.environ, GPU_CHECK_DRY_RUN="1"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    usage = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                           timeout=60)
    stages = ("smoke", "step128", "infer", "encoder", "step", "stepbf16", "layout", "hostcpu")
    assert usage.returncode == 0 and all(f"#   {s} " in usage.stdout for s in stages)
    assert "set -euo" not in usage.stdout and usage.stdout.strip().endswith("against the parsers).")


def test_gpu_smoke_runs_the_scripts_end_to_end(tmp_path):
    # the GPU machine's end-to-end check, on CPU at its tiny settings: every script runs, a resumed run ends
    # where the uninterrupted one does (bit for bit on CPU), test_LA reports metrics for fp32 and bf16
    out = gpu_smoke.main(["--device", "cpu", "--synthetic", "--quick", "--iterations", "2", "--test_cases", "1",
                          "--num_workers", "0", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "s.json")])
    assert out["failed"] == [] and json.loads((tmp_path / "s.json").read_text())["failed"] == []
    assert set(out["steps"]) == {"semisam_fp32", "semisam_resumed", "semisam_resumed_part2", "semisam_bf16",
                                 "uamt_fp32", "semisam_plus_unc_val", "pretrain_finetune", "test_none", "test_bf16"}
    assert out["steps"]["semisam_plus_unc_val"]["best_model_written"] is True
    assert out["steps"]["semisam_resumed_part2"]["max_abs_diff_to_uninterrupted"] == 0.0
    # without native bf16 the bf16 commands must refuse (one line, exit 2) instead of running
    assert out["native_bf16"] == bf16_supported("cpu")
    for name in ("semisam_bf16", "test_bf16"):
        assert out["steps"][name].get("refused_as_expected", True) is True
        assert ("refused_as_expected" in out["steps"][name]) != out["native_bf16"]
    assert set(out["test_metrics"]) == ({"none", "bf16"} if out["native_bf16"] else {"none"})
    for amp in out["test_metrics"]:
        mean = out["test_metrics"][amp]["mean"]
        assert set(mean) == {"dice", "jaccard", "hd95", "asd"} and 0.0 <= mean["dice"] <= 1.0
        assert out["test_metrics"][amp]["distance_unit"] == "mm"
    failing = gpu_smoke._run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=60)
    assert failing["rc"] == 3 and "boom" in failing["tail"]


def test_script_runs_from_code_dir():
    # bench_step.py already runs as a script in its workers; the other two share its header
    proc = subprocess.run([sys.executable, "benchmarks/bench_encoder.py", "--help"], cwd=str(BENCH_DIR.parent),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fast vs reference" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------- bench_commits (before / after)
def _payload(step_wall: dict, step_cpu: dict) -> dict:
    return {"results": [{"label": k, "step": {"median": v}, "cpu_step": {"median": step_cpu[k]}}
                        for k, v in step_wall.items()]}


def test_bench_commits_combines_rounds_as_medians_and_ratios():
    from benchmarks.bench_commits import combine
    runs = {"before": [_payload({"mt": 2.0, "uamt": 10.0}, {"mt": 1.0, "uamt": 5.0}),
                       _payload({"mt": 4.0, "uamt": 10.0}, {"mt": 3.0, "uamt": 5.0}),
                       _payload({"mt": 3.0, "uamt": 12.0}, {"mt": 2.0, "uamt": 6.0})],
            "after": [_payload({"mt": 3.3, "uamt": 9.0}, {"mt": 2.2, "uamt": 4.5})] * 3}
    rows = combine(runs, [("before", None), ("after", None)])
    assert [r["label"] for r in rows] == ["mt", "uamt"]
    assert rows[0]["before"]["wall"] == 3.0 and rows[0]["before"]["cpu"] == 2.0
    assert rows[0]["after/before"]["wall"] == pytest.approx(1.1) and rows[0]["after/before"]["cpu"] == pytest.approx(1.1)
    assert rows[1]["after/before"]["wall"] == pytest.approx(0.9) and rows[0]["before"]["rounds_wall"] == [2.0, 4.0, 3.0]


def test_bench_commits_rejects_bad_code_entries(tmp_path):
    from benchmarks.bench_commits import parse_args
    with pytest.raises(C.BenchmarkError, match="NAME=DIR"):
        parse_args(["--code", f"a={tmp_path}", "--code", "b=.", "--", "--compare", "mt"])
    here = str(Path(__file__).resolve().parents[1])
    with pytest.raises(C.BenchmarkError, match="two --code"):
        parse_args(["--code", f"a={here}"])
    args, codes, bench = parse_args(["--code", f"a={here}", "--code", f"b={here}", "--", "--compare", "mt", "sup"])
    assert [n for n, _ in codes] == ["a", "b"] and bench == ["--compare", "mt", "sup"]
