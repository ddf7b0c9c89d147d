"""Releasing a trained student as float16 (release_model.py) and reading a run's log back (plot_training.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import plot_training
import release_model
import test_LA
from networks.vnet import VNet
from utils.errors import ConfigError
from utils.inference import load_specialist
from utils.run_log import moving_average, read_run_log

CODE_DIR = Path(__file__).resolve().parents[1]


def _trained_like_net(seed: int = 0) -> VNet:
    """A batchnorm V-Net with non-trivial running statistics (as a trained one has)."""
    torch.manual_seed(seed)
    net = VNet(n_filters=4, normalization="batchnorm")
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 1, 32, 32, 16))
    return net.eval()


def test_release_is_float16_loads_into_float32_and_is_exact(tmp_path):
    net = _trained_like_net()
    src = tmp_path / "iter_6000.pth"
    torch.save(net.state_dict(), src)
    info = release_model.main(["--model_path", str(src), "--out", str(tmp_path / "rel" / "LA_X.pth")])
    released = torch.load(info["out"], weights_only=True)
    assert set(released) == set(net.state_dict())
    for k, v in released.items():
        assert v.dtype == (torch.float16 if torch.is_floating_point(net.state_dict()[k]) else net.state_dict()[k].dtype)
    assert 0 < info["max_rel_rounding"] <= 2 ** -11 and info["max_abs_rounding"] <= 2 ** -11 * info["max_abs"]
    assert info["sha256"] == release_model.sha256(info["out"])
    # test_LA.py's loader: float32 network holding exactly the float16 values
    loaded, config = load_specialist(info["out"])
    assert config["n_filters"] == 4 and config["normalization"] == "batchnorm"
    for k, v in loaded.state_dict().items():
        if torch.is_floating_point(v):
            assert v.dtype == torch.float32 and torch.equal(v, released[k].float())
    # never replaced silently
    with pytest.raises(ConfigError, match="--overwrite"):
        release_model.main(["--model_path", str(src), "--out", info["out"]])
    release_model.main(["--model_path", str(src), "--out", info["out"], "--overwrite"])


def test_release_refuses_values_beyond_float16():
    with pytest.raises(ValueError, match="w: .*does not fit float16"):
        release_model.half_state_dict({"w": torch.tensor([1.0, 7e4])})
    half, report = release_model.half_state_dict({"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)})
    assert half["n"].dtype == torch.int64 and report["max_abs"] == 3.0 and report["max_rel_rounding"] == 0.0
    _, report = release_model.half_state_dict({"w": torch.tensor([1e-9, 1.0])})     # flushed to 0: not "relative"
    assert report["max_rel_rounding"] == 0.0 and report["max_abs_rounding"] == pytest.approx(1e-9)


def test_release_script_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "release_model.py", "--model_path", str(tmp_path / "none.pth"), "--out",
                           str(tmp_path / "o.pth")], cwd=CODE_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("release_model.py: error: checkpoint not found")


def test_released_model_reproduces_its_metrics_with_test_la(la_data_dir, tmp_path):
    # what issue 16's releases promise: test_LA.py on the released float16 file gives the same numbers twice,
    # and the numbers of the float32 network holding the float16 values
    src = tmp_path / "iter.pth"
    torch.save(_trained_like_net(1).state_dict(), src)
    rel = release_model.release(src, tmp_path / "LA_T.pth")["out"]
    args = ["--root_path", str(la_data_dir), "--max_cases", "1", "--patch_size", "64", "64", "48",
            "--stride_xy", "64", "--stride_z", "48", "--no_save_nii", "--device", "cpu"]
    a = test_LA.main(args + ["--model_path", rel, "--out_dir", str(tmp_path / "a")])
    b = test_LA.main(args + ["--model_path", rel, "--out_dir", str(tmp_path / "b")])
    assert a["mean"] == b["mean"]
    assert (tmp_path / "a" / "metrics.csv").read_text() .splitlines()[1].split(",")[:5] == \
        (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1].split(",")[:5]


LOG = """[23:59:58.000] settings: {'exp': 'x'}
[23:59:59.000] iteration 1 : total: 0.9, supervised: 0.9, dice: 0.8, train/lr: 0.01, weights/consistency: 0
[00:00:01.000] iteration 2 : total: 0.7, supervised: 0.7, dice: 0.6, train/lr: 0.01, weights/consistency: 0.001
[00:00:03.000] iteration 3 : total: 0.5, supervised: 0.5, dice: 0.5, train/lr: 0.01, weights/consistency: 0.002
[00:00:04.000] save model to /m/iter_2.pth
[02:00:00.000] resumed from /m/train_state.pth at iteration 2
[02:00:02.000] iteration 3 : total: 0.4, supervised: 0.4, dice: 0.45, train/lr: 0.01, weights/consistency: 0.002
[02:00:04.000] iteration 4 : total: 0.3, supervised: 0.3, consistency: 0.01, dice: 0.4, train/lr: 0.001, weights/consistency: 0.003
"""


def test_run_log_keeps_the_last_of_repeated_iterations_and_counts_only_running_time(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    log = read_run_log(tmp_path / "log.txt")
    assert log.iterations.tolist() == [1, 2, 3, 4]
    assert log.values["total"].tolist() == [0.9, 0.7, 0.4, 0.3]          # the resumed iteration 3 wins
    assert np.isnan(log.values["consistency"][:3]).all() and log.values["consistency"][3] == 0.01
    assert log.resumes == 1 and log.events[0].startswith("settings")
    # midnight crossed; the 2-hour pause while stopped is not training time
    assert log.seconds.tolist() == [1.0, 3.0, 7204.0, 7206.0]
    assert log.train_seconds == pytest.approx(1 + 2 + 2 + 1 + 2 + 2)
    with pytest.raises(ValueError, match="no 'iteration N"):
        (tmp_path / "empty.txt").write_text("[00:00:00.000] settings: {}\n")
        read_run_log(tmp_path / "empty.txt")


def test_moving_average_ignores_nans():
    np.testing.assert_allclose(moving_average(np.array([1.0, np.nan, 3.0, 5.0]), 2), [1.0, 1.0, 3.0, 4.0])


def test_plot_training_writes_curves_csv_and_summary(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text(LOG)
    summary = plot_training.main(["--run", str(tmp_path / "run"), "--out_dir", str(tmp_path / "out"), "--every", "2",
                                  "--window", "2", "--title", "t"])
    assert (tmp_path / "out" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "out" / "training_log.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,seconds,") and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    assert summary["last_iteration"] == 4 and summary["resumes"] == 1
    assert summary["mean_of_last_2"]["total"] == pytest.approx(0.35)
    assert json.loads((tmp_path / "out" / "training_run.json").read_text()) == summary


# ------------------------------------------------------------------------------- the committed releases
REPO = CODE_DIR.parent


def _released() -> list[tuple[str, str]]:
    """(name, sha256) of every checkpoint model/README.md lists under model/released/."""
    import re
    text = (REPO / "model" / "README.md").read_text()
    return re.findall(r"\| `(LA_\w+)\.pth` \|[^|]*\| `([0-9a-f]{64})` \|", text)


def test_every_released_file_is_listed_with_its_sha256():
    from utils.io import file_sha256
    listed = dict(_released())
    on_disk = sorted(p.stem for p in (REPO / "model" / "released").glob("LA_*.pth"))
    assert on_disk and sorted(listed) == on_disk
    for name, sha in listed.items():
        assert file_sha256(REPO / "model" / "released" / f"{name}.pth") == sha, name


def test_released_checkpoints_reproduce_their_committed_metrics(la_data_dir):
    """The released float16 file, evaluated as test_LA.py does (voxels, 112x112x80 stride 18/4, largest
    component), gives the committed per-case numbers; the fastest committed case of each release is rerun."""
    import csv
    from utils.compare import evaluate_checkpoint
    for name, _ in _released():
        rows = list(csv.DictReader(open(REPO / "results" / name / "test_voxels" / "metrics.csv")))
        summary = json.loads((REPO / "results" / name / "test_voxels" / "summary.json").read_text())
        assert len(rows) == summary["n_cases"] == 20
        assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(summary["mean"]["dice"], abs=1e-12)
        row = min(rows, key=lambda r: float(r["seconds"]))
        result = evaluate_checkpoint(REPO / "model" / "released" / f"{name}.pth", la_data_dir, [row["case"]],
                                     patch_size=summary["patch_size"], stride_xy=summary["stride_xy"],
                                     stride_z=summary["stride_z"], spacing=None, say=lambda m: None)
        got = result["cases"][0]
        # exact on the machine that committed them; another CPU sums in another order (a few boundary voxels)
        assert got["dice"] == pytest.approx(float(row["dice"]), abs=2e-3), name
        assert got["jaccard"] == pytest.approx(float(row["jaccard"]), abs=3e-3), name
        assert got["hd95"] == pytest.approx(float(row["hd95_voxels"]), abs=1.0), name
