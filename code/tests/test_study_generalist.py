"""study_generalist.py: SemiSAM's gain over MT against the generalist's quality, in --quick mode in tmp_path.

Two tiny generalists (random weights from random:<arch JSON>, and a checkpoint with its JSON beside it), two
seeds, SemiSAM and SemiSAM+: 10 runs of 3 iterations. Checked: the outputs and their rows, the cache (a second
invocation trains nothing, read from the runs' logs and the study's record), the resume rules (a trained but
unevaluated run is only evaluated, a run stopped half-way resumes to the same result, a changed generalist
retrains only its runs), the t interval on hand-made numbers, and one-line errors for bad input.
"""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import study_generalist as study
from tests.test_demo import png_size, tiny_generalist
from tests.test_pretrain_generalist import TINY
from training.config import TrainConfig
from training.run import main as train
from utils.compare import ComparisonError, seed_averaged_gain, t_interval
from utils.errors import ProjectError
from utils.report import gain_cell

ROWS = [(None, "MT"), ("rnd", "SemiSAM"), ("rnd", "SemiSAM+"), ("ck", "SemiSAM"), ("ck", "SemiSAM+")]


def study_argv(root: Path, *extra: str, seeds=("1", "2")) -> list[str]:
    return ["--quick", "--generalists", f"rnd=random:{root / 'tiny.json'}", f"ck={root / 'ck.pth'}",
            "--seeds", *seeds, "--out", str(root / "out"), "--work", str(root / "work"), "--threads", "1",
            "--no_progress", *extra]


def run_study(argv) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = study.main(argv)
    return result, stdout.getvalue()


def logs(root: Path) -> dict:
    """Every run's log.txt (what training appends to) with its contents."""
    return {p: p.read_text() for p in sorted((root / "work" / "runs").glob("seed*/*/*/log.txt"))}


def scores(record: dict) -> list[dict]:
    """A run's per-case metrics without their timings."""
    return [{k: v for k, v in c.items() if k != "seconds"} for c in record["result"]["cases"]]


@pytest.fixture(scope="module")
def first_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    (root / "tiny.json").write_text(json.dumps(TINY))
    tiny_generalist(root / "ck.pth")
    result, out = run_study(study_argv(root))
    return root, result, out


def test_study_writes_json_md_and_figure_with_the_expected_rows(first_study):
    root, result, out = first_study
    assert [(r["generalist"], r["method"]) for r in result["rows"]] == ROWS
    assert [r["source"] for r in result["runs"]] == ["trained"] * 10
    assert [(r["seed"], r["generalist"], r["method"]) for r in result["runs"]] == [
        (seed, g, m) for seed in (1, 2) for g, m in ROWS]
    on_disk = json.loads((root / "out" / "study.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    assert on_disk["seeds"] == [1, 2] and on_disk["methods"] == ["SemiSAM", "SemiSAM+"] and on_disk["quick"]
    assert on_disk["machine"]["cpu"] and on_disk["command"][0] == "study_generalist.py"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(study.__file__).parent, capture_output=True,
                          text=True)
    assert on_disk["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    # each generalist: its file, identity and zero-shot quality (10 clicks from the ground truth, the patch crop)
    rnd, ck = on_disk["generalists"]
    assert (rnd["name"], rnd["kind"], ck["name"], ck["kind"]) == ("rnd", "random", "ck", "checkpoint")
    assert rnd["path"] == str(root / "work" / "generalists" / "rnd.pth")
    assert json.loads(Path(rnd["arch"]).read_text()) == TINY and ck["arch"] == str(root / "ck.json")
    assert set(torch.load(rnd["path"], weights_only=True)) >= {"model_state_dict"}    # the official format
    for g in (rnd, ck):
        zero = g["zero_shot"]
        assert zero["num_clicks"] == 10 and zero["crop"] == [32, 32, 32] and zero["summary"]["n"] == 2
        assert 0 <= zero["summary"]["dice_mean"] <= 100 and len(g["sha256"]) == 64
    assert rnd["sha256"] != ck["sha256"]
    # the rows are what the runs give: the baseline's mean, each method's mean and gain over seeds
    runs = {(r["seed"], r["generalist"], r["method"]): r["result"] for r in on_disk["runs"]}
    mt = on_disk["rows"][0]
    assert mt["gain"] is None and mt["mean_dice"] == pytest.approx(
        50 * (runs[(1, None, "MT")]["mean"]["dice"] + runs[(2, None, "MT")]["mean"]["dice"]))
    for row in on_disk["rows"][1:]:
        g = next(x for x in on_disk["generalists"] if x["name"] == row["generalist"])
        assert row["zero_shot_dice"] == g["zero_shot"]["summary"]["dice_mean"]
        again = seed_averaged_gain([runs[(s, None, "MT")] for s in (1, 2)],
                                   [runs[(s, row["generalist"], row["method"])] for s in (1, 2)])
        assert row["gain"]["gain_points"] == pytest.approx(again["gain_points"])
        assert row["gain"]["n_cases"] == 2 and row["gain"]["n_seeds"] == 2
        assert row["gain"]["wins"] + row["gain"]["losses"] <= 2
    # every run trained with its own generalist, method and seed, in its own folder
    cfg = json.loads((root / "work" / "runs" / "seed2" / "ck" / "semisam_plus" / "config.json").read_text())
    assert cfg["generalist"] == [str(root / "ck.pth")] and cfg["generalist_arch"] == str(root / "ck.json")
    assert (cfg["generalist_term"], cfg["prompt"], cfg["seed"], cfg["max_iterations"]) == ("semisam_plus", "unc", 2, 3)
    cfg = json.loads((root / "work" / "runs" / "seed1" / "baseline" / "mt" / "config.json").read_text())
    assert cfg["generalist"] == [] and cfg["seed"] == 1
    # study.md: the table (its header says how the interval is made) with one row per generalist and method
    md = (root / "out" / "study.md").read_text()
    assert "95 % CI: t interval over 2 test cases of the paired per-case differences, each averaged over the 2 " \
           "seeds" in md
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
             if line.startswith("| ") and line.count("|") == 7]
    assert table[0][:3] == ["generalist", "zero-shot Dice (%)", "method"]
    assert [(r[0], r[2]) for r in table[1:6]] == [("none", "MT")] + [(g, m) for g, m in ROWS[1:]]
    for r, row in zip(table[2:6], on_disk["rows"][1:]):
        assert r[4] == gain_cell(row["gain"]) and r[5] == f"{row['gain']['wins']} / {row['gain']['losses']}"
    width, height = png_size(root / "out" / "gain_vs_generalist.png")
    assert width >= 500 and height >= 300
    assert "[study] generalist rnd (computed): Generalist quality on 2 test case(s)" in out
    assert "[study] run 10/10 seed 2 SemiSAM+ with ck: training 3 iterations" in out
    assert "10 runs (10 trained)" in out


def test_second_invocation_reuses_every_run(first_study):
    root, first, _ = first_study
    before = logs(root)
    assert len(before) == 10
    again, out = run_study(study_argv(root))
    assert [r["source"] for r in again["runs"]] == ["cached"] * 10
    assert [g["zero_shot"]["source"] for g in again["generalists"]] == ["cached", "cached"]
    assert logs(root) == before                 # no training appended a line anywhere
    assert "training 3 iterations" not in out and "resuming" not in out and "10 runs (10 cached)" in out
    assert json.loads(json.dumps(again["rows"])) == json.loads(json.dumps(first["rows"]))


def test_unevaluated_and_interrupted_runs_continue_and_changed_generalists_retrain(first_study):
    root, first, _ = first_study
    runs = root / "work" / "runs"
    expected = {(r["seed"], r["generalist"], r["method"]): scores(r) for r in first["runs"]}
    # trained, but stopped before its evaluation was recorded: evaluated only
    evaluated = runs / "seed1" / "ck" / "semisam_mt"
    (evaluated / study.RESULT_NAME).unlink()
    # stopped half-way (what Ctrl-C leaves: a train state at iteration 1 of 3): resumed by the training code
    resumed = runs / "seed2" / "rnd" / "semisam_plus"
    saved = json.loads((resumed / "config.json").read_text())
    fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    train(dict(fields, stop_after=1, overwrite=True, resume=None, progress=False), [])
    (resumed / study.RESULT_NAME).unlink()
    assert not (resumed / "iter_3.pth").exists()
    before = logs(root)
    again, out = run_study(study_argv(root))
    sources = {(r["seed"], r["generalist"], r["method"]): r["source"] for r in again["runs"]}
    assert sources.pop((1, "ck", "SemiSAM")) == "evaluated" and sources.pop((2, "rnd", "SemiSAM+")) == "resumed"
    assert set(sources.values()) == {"cached"}
    after = logs(root)
    assert after[evaluated / "log.txt"] == before[evaluated / "log.txt"]
    assert "resumed from" in after[resumed / "log.txt"].replace(before[resumed / "log.txt"], "")
    # the same results as the uninterrupted first invocation (same machine and thread count: bit-identical)
    for r in again["runs"]:
        assert scores(r) == expected[(r["seed"], r["generalist"], r["method"])], r["label"]
    # another checkpoint under the same name: only its runs train again, the others stay cached
    tiny_generalist(root / "ck.pth", seed=6)
    changed, out = run_study(study_argv(root, "--methods", "SemiSAM", seeds=("1",)))
    sources = {(r["generalist"], r["method"]): r["source"] for r in changed["runs"]}
    assert sources == {(None, "MT"): "cached", ("rnd", "SemiSAM"): "cached", ("ck", "SemiSAM"): "trained"}
    assert [g["zero_shot"]["source"] for g in changed["generalists"]] == ["cached", "computed"]
    assert [(r["generalist"], r["method"]) for r in changed["rows"]] == [(None, "MT"), ("rnd", "SemiSAM"),
                                                                         ("ck", "SemiSAM")]
    assert list((runs / "seed1" / "ck" / "semisam_mt").glob("previous_*/iter_3.pth"))   # the old run moved aside


def test_t_interval_and_seed_averaged_gain_on_hand_made_numbers():
    ci = t_interval([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5), t(0.975, 4 df) = 2.776445: half width 2.776445 * sqrt(2.5 / 5) = 1.963243
    assert ci["mean"] == 3 and ci["sd"] == pytest.approx(math.sqrt(2.5))
    assert (ci["low"], ci["high"]) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))
    assert t_interval([1, 2, 3, 4, 5], 0.90)["half_width"] == pytest.approx(2.131847 * math.sqrt(0.5), abs=1e-6)
    assert math.isnan(t_interval([4.0])["half_width"]) and t_interval([4.0])["mean"] == 4.0

    def runs(dices):
        return {"mean": {"dice": sum(dices) / len(dices)},
                "cases": [{"case": f"c{i}", "dice": d} for i, d in enumerate(dices)]}
    base = [0.50, 0.60, 0.70, 0.40, 0.80]
    # per-seed differences (points) [0, 3, 1, 5, 6] and [2, 1, 5, 3, 4]: their mean per case is [1, 2, 3, 4, 5]
    seed1 = runs([b + d / 100 for b, d in zip(base, [0, 3, 1, 5, 6])])
    seed2 = runs([b + d / 100 for b, d in zip(base, [2, 1, 5, 3, 4])])
    gain = seed_averaged_gain([runs(base), runs(base)], [seed1, seed2])
    assert gain["per_case"] == pytest.approx({"c0": 1, "c1": 2, "c2": 3, "c3": 4, "c4": 5})
    assert gain["gain_points"] == pytest.approx(3)
    assert (gain["ci_low"], gain["ci_high"]) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))
    assert (gain["wins"], gain["losses"], gain["n_cases"], gain["n_seeds"]) == (5, 0, 5, 2)
    assert gain_cell(gain) == "+3.00 [+1.04, +4.96]"
    one = seed_averaged_gain([runs([0.5])], [runs([0.4])])
    assert one["gain_points"] == pytest.approx(-10) and one["losses"] == 1
    assert gain_cell(one) == "-10.00 [n/a: one case]"
    with pytest.raises(ComparisonError, match="one baseline run per run"):
        seed_averaged_gain([runs(base)], [seed1, seed2])
    with pytest.raises(ComparisonError, match="other cases"):
        seed_averaged_gain([runs(base), runs(base[:4])], [seed1, runs(base[:4])])


def test_generalist_specs(tmp_path):
    ck = tiny_generalist(tmp_path / "ck.pth")
    assert study.parse_generalist(f"a={ck}") == dict(name="a", spec=str(ck), kind="checkpoint", path=str(ck),
                                                     arch=str(tmp_path / "ck.json"))
    assert study.parse_generalist(f"b={ck}:vit_b_ori")["arch"] == "vit_b_ori"
    assert study.parse_generalist("c=random:vit_tiny_demo") == dict(name="c", spec="random:vit_tiny_demo",
                                                                    kind="random", path=None, arch="vit_tiny_demo")
    bare = tmp_path / "bare.pth"
    bare.write_bytes(ck.read_bytes())
    for text, message in [("noequals", "expected NAME=SPEC"), ("=x.pth", "expected NAME=SPEC"),
                          ("a b=x", "expected NAME=SPEC"), (f"baseline={ck}", "baseline's folder"),
                          ("r=random:", "needs an architecture"), (f"x={tmp_path / 'nope.pth'}", "nope.pth not found"),
                          (f"x={tmp_path / 'nope.pth'}:vit_b_ori", "nope.pth not found"),
                          (f"x={bare}", "no architecture file .*bare.json beside the checkpoint")]:
        with pytest.raises(study.StudyError, match=message):
            study.parse_generalist(text)
    for argv, message in [(["--generalists", f"a={ck}", f"a={ck}"], "--generalists: a given more than once"),
                          (["--generalists", f"a={ck}", "--seeds", "1", "1"], "--seeds: 1 given more than once"),
                          (["--generalists", "r=random:no_such_arch"], "no_such_arch"),
                          (["--generalists", f"a={ck}", "--patch_size", "40", "32", "32"], "multiple of 16")]:
        with pytest.raises(ProjectError, match=message):
            study.main(argv + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()     # refused before any work


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    code = Path(study.__file__).parent
    proc = subprocess.run([sys.executable, "study_generalist.py", "--generalists", f"x={tmp_path / 'nope.pth'}",
                           "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")],
                          cwd=code, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("study_generalist.py: error: --generalists 'x=") and "not found" in proc.stderr


def test_defaults_are_the_demo_recipe_with_more_test_cases():
    args = study.parse_args(["--generalists", "a=random:vit_tiny_demo"])
    assert args.seeds == [1337, 1338, 1339] and args.methods == ["SemiSAM", "SemiSAM+"]
    assert Path(args.out).resolve() == (Path(study.__file__).parent.parent / "results" / "generalist_study").resolve()
    assert Path(args.work).resolve() == (Path(study.__file__).parent.parent / "model" / "generalist_study").resolve()
    s = study.settings_from(args, study.STUDY_DEFAULTS, study.STUDY_QUICK)
    assert s["phantom_test"] == 20 and s["phantom_train"] == study.DEFAULTS["phantom_train"]
    # the demo's training and evaluation settings, without those of the demo's own generalist and figure
    assert {k: v for k, v in s.items() if k != "phantom_test"} == {
        k: v for k, v in study.DEFAULTS.items() if k != "phantom_test" and k in study.STUDY_DEFAULTS}
    assert not {"pretrain_scale", "figure_cases", "seed"} & set(s) and {"iterations", "stride_z"} <= set(s)
    assert study.settings_from(study.parse_args(["--generalists", "a=random:x", "--phantom_test", "8"]),
                               study.STUDY_DEFAULTS, study.STUDY_QUICK)["phantom_test"] == 8
    with pytest.raises(SystemExit):
        study.parse_args(["--generalists", "a=random:x", "--pretrain_scale", "0.5"])
