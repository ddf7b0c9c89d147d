"""Entry scripts end a run refused for bad input with one line ``<script>.py: error: <message>`` on stderr
and exit status 2, without a traceback, and leave existing files as they were; a bug keeps its traceback.

Each row runs the script as a user would (a subprocess in code/), on a tiny synthetic LA-layout dataset written
here, so no real data is needed. Every training row points at the same pre-existing run folder, which must stay
byte-identical.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.sam_med3d import build_sam3d_from_config
from networks.vnet import VNet
from utils.errors import ConfigError, DataError, ProjectError, one_line, run_entry

from test_la_heart import write_case as la_heart_case
from test_train_common import tiny_sam_config

CODE_DIR = Path(__file__).resolve().parents[1]
SHAPE = (40, 36, 24)
GOOD = ["C0", "C1", "C2"]


def write_case(base: Path, case: str, seed: int, image=None, label=None) -> Path:
    """<base>/<case>/mri_norm2.h5 with a random valid case of SHAPE; ``image``/``label`` replace it, False omits it."""
    return la_heart_case(base, case, image=image, label=label, shape=SHAPE, seed=seed)


def write_list(path: Path, cases) -> Path:
    path.write_text("".join(c + "\n" for c in cases))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good and bad cases, a list per row, a tiny SAM with renamed keys, a V-Net checkpoint and an existing run."""
    root = tmp_path_factory.mktemp("entry")
    base = root / "2018LA_Seg_Training Set"
    for i, case in enumerate(GOOD):
        write_case(base, case, i)
    truncated = write_case(base, "TRUNC", 10)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    write_case(base, "NOLABEL", 11, label=False)
    two = np.zeros(SHAPE, np.uint8)
    two[1, 2, 3] = 2
    write_case(base, "LABEL2", 12, label=two)
    nan = np.zeros(SHAPE, np.float32)
    nan[4, 5, 6] = np.nan
    write_case(base, "NANIMG", 13, image=nan)
    lists = {name: write_list(root / f"{name}.list", cases) for name, cases in {
        "good": GOOD, "ghost": ["C0", "GHOST", "C1"], "trunc": ["TRUNC"] + GOOD, "nolabel": ["NOLABEL"] + GOOD,
        "label2": ["LABEL2"] + GOOD, "nan": ["NANIMG"] + GOOD, "test": ["C0", "NANIMG"]}.items()}
    write_list(root / "train.list", GOOD)

    sam_json = root / "tiny_sam.json"
    sam_json.write_text(json.dumps(tiny_sam_config()))
    sd = build_sam3d_from_config(tiny_sam_config()).state_dict()
    sam = root / "tiny_sam.pth"
    torch.save({"model_state_dict": sd}, sam)
    renamed = root / "renamed_sam.pth"   # another naming: 'encoder.' instead of the official 'image_encoder.'
    torch.save({"model_state_dict": {k.replace("image_encoder.", "encoder."): v for k, v in sd.items()}}, renamed)
    vnet = root / "vnet.pth"
    torch.save(VNet(n_filters=4).state_dict(), vnet)

    # an earlier run's folder: every training row below must leave it exactly as it is
    run = root / "model" / "LA" / "earlier"
    (run / "log").mkdir(parents=True)
    for name, data in (("config.json", b'{"exp": "earlier"}\n'), ("log.txt", b"[00:00:00.000] settings: ...\n"),
                       ("train_state.pth", b"state bytes"), ("iter_2.pth", b"weights"),
                       ("log/events.out.tfevents.1.host", b"events")):
        (run / name).write_bytes(data)
    predictions = root / "prediction"       # an earlier test_LA.py output folder
    predictions.mkdir()
    (predictions / "metrics.csv").write_text("case,dice\nC0,0.9\n")
    (predictions / "summary.json").write_text("{}\n")
    return dict(root=root, base=base, lists=lists, sam_json=sam_json, sam=sam, renamed=renamed, vnet=vnet, run=run,
                predictions=predictions)


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder``: relative path -> (bytes, mtime_ns) (None for folders)."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, SEMISAM_NO_REEXEC="1", OMP_NUM_THREADS="1")
    if script.startswith("-m "):
        command = [sys.executable, "-m", script[3:], *map(str, args)]
    else:
        command = [sys.executable, script, *map(str, args)]
    return subprocess.run(command, cwd=CODE_DIR, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *culprits: str) -> str:
    """Exit status 2, no traceback, stderr's last non-empty line ``<prog>: error: ...`` naming the culprits."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[-1], (culprit, lines[-1])
    print(lines[-1])   # shown with pytest -s
    return lines[-1]


def train_args(world, list_name: str) -> list:
    """Flags of a tiny CPU run writing into the earlier run's folder (later flags override them). With
    ``--overwrite``, which may move the earlier run's files aside only once every input has been checked: a
    refused run leaves them where they are."""
    return ["--root_path", world["base"], "--train_list", world["lists"][list_name],
            "--model_dir", world["root"] / "model", "--exp", "LA/earlier", "--labeled_num", "2",
            "--max_iterations", "2", "--patch_size", "32", "32", "16", "--n_filters", "4", "--num_workers", "0",
            "--device", "cpu", "--progress", "0", "--tune_malloc", "0", "--threads", "1", "--overwrite"]


# row -> (script, list, extra flags (a function of the world), what the message must name); the bad case is
# always the first of its list, so it is labeled and its label is read
TRAIN_ROWS = {
    "missing_data_folder": ("train_LA_mt.py", "good", lambda w: ["--root_path", w["root"] / "NOWHERE" / "cases"],
                            ["data folder not found", "NOWHERE"]),
    "case_missing_from_folder": ("train_LA_mt.py", "ghost", None, ["'GHOST'", "case folder not found"]),
    "truncated_h5": ("train_LA_uamt.py", "trunc", None, ["'TRUNC'", "truncated"]),
    "h5_without_label": ("train_LA_sup.py", "nolabel", lambda w: ["--cache", "0"],
                         ["'NOLABEL'", "missing dataset 'label'"]),
    "label_value_2": ("train_LA_mt.py", "label2", None, ["'LABEL2'", "label holds values {2}"]),
    "nan_image": ("train_LA_mt.py", "nan", lambda w: ["--cache", "0"], ["'NANIMG'", "1 NaN"]),
    "labeled_num_0": ("train_LA_mt.py", "good", lambda w: ["--labeled_num", "0"], ["labeled_num must be >= 1, got 0"]),
    "labeled_num_above_list": ("train_LA_sup.py", "good", lambda w: ["--labeled_num", "4"],
                               ["labeled_num must be in [1, 3]"]),
    "patch_not_multiple_of_16": ("train_LA_semisam_mt.py", "good", lambda w: ["--patch_size", "32", "32", "20"],
                                 ["patch_size must be three positive multiples of 16", "(32, 32, 20)"]),
    "patch_larger_than_the_generalist_input": (
        "train_LA_semisam_mt.py", "good",
        lambda w: ["--generalist", w["sam"], "--generalist_arch", w["sam_json"], "--patch_size", "48", "32", "16"],
        ["--geometry pad", "(48, 32, 16)", "32^3 input", "tiny_sam.pth"]),
    # --resume without a value: the earlier run's own train_state.pth, here not a train state at all
    "resume_from_a_bad_train_state": ("train_LA_mt.py", "good", lambda w: ["--resume", "--overwrite", "0"],
                                      ["earlier/train_state.pth", "is not a readable train state"]),
    # issue 18, trap 1: a new run never replaces another run's files
    "another_run_in_the_folder": ("train_LA_mt.py", "good", lambda w: ["--overwrite", "0"],
                                  ["LA/earlier already holds a run", "config.json", "train_state.pth",
                                   "pass --resume", "--overwrite"]),
    "resume_and_overwrite": ("train_LA_mt.py", "good", lambda w: ["--resume"], ["--overwrite", "--resume",
                                                                              "choose one"]),
    # issue 18, trap 2: what the first validation needs is checked before the first iteration
    "validation_case_missing": ("train_LA_mt.py", "good",
                                lambda w: ["--val_list", w["lists"]["ghost"], "--val_every", "1"],
                                ["--val_list", "ghost.list", "'GHOST'", "case folder not found"]),
    "run_folder_not_writable": ("train_LA_mt.py", "good", lambda w: ["--model_dir", w["vnet"]],
                                ["vnet.pth is a file, not a folder"]),
    "generalist_with_other_key_names": (
        "train_LA_semisam_plus.py", "good",
        lambda w: ["--generalist", w["renamed"], "--generalist_arch", w["sam_json"], "--num_clicks", "2"],
        ["renamed_sam.pth", "unexpected keys", "encoder."]),
}


@pytest.mark.parametrize("row", list(TRAIN_ROWS))
def test_training_scripts_report_bad_input_in_one_line_and_touch_no_file(world, row):
    script, list_name, extra, culprits = TRAIN_ROWS[row]
    before = snapshot(world["root"] / "model")
    proc = run_script(script, *train_args(world, list_name), *(extra(world) if extra else []))
    assert_one_line_error(proc, script, *culprits)
    assert snapshot(world["root"] / "model") == before   # nothing written, replaced, appended or created


def test_test_la_reports_a_bad_case_before_touching_its_output_folder(world):
    before = snapshot(world["predictions"])
    proc = run_script("test_LA.py", "--root_path", world["base"], "--test_list", world["lists"]["test"],
                      "--model_path", world["vnet"], "--out_dir", world["predictions"], "--device", "cpu",
                      "--patch_size", "32", "32", "16", "--stride_xy", "16", "--stride_z", "8")
    assert_one_line_error(proc, "test_LA.py", "'NANIMG'", "NaN")
    assert snapshot(world["predictions"]) == before


@pytest.mark.parametrize("script", ["test_LA.py", "predict.py", "test.py"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(world, tmp_path, script):
    """Issue 18, trap 9: random bytes as --model_path get one line saying so, not PyTorch's advice to retry
    with weights_only=False."""
    junk = tmp_path / "random.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    args = {"test_LA.py": ["--root_path", world["base"], "--test_list", world["lists"]["good"], "--device", "cpu",
                           "--out_dir", tmp_path / "out"],
            "predict.py": ["--input", tmp_path, "--output", tmp_path / "out", "--device", "cpu"],
            "test.py": ["--dataset", tmp_path, "--device", "cpu"]}[script]
    if script == "predict.py":
        (tmp_path / "scan.nii.gz").write_bytes(b"")
    if script == "test.py":
        (tmp_path / "dataset.json").write_text(json.dumps({"format": "semisam_prepared_dataset",
                                                           "class_names": ["background", "x"]}))
        (tmp_path / "test.list").write_text("C0\n")
    proc = run_script(script, "--model_path", junk, *args)
    line = assert_one_line_error(proc, script, "random.pth: it is not a PyTorch checkpoint")
    assert "weights_only" not in line and "issue" not in line


def test_pretrain_generalist_reports_a_generalist_with_other_key_names(world):
    out = world["root"] / "pretrained.pth"
    out.write_bytes(b"an earlier checkpoint")
    before = snapshot(world["root"])
    proc = run_script("pretrain_generalist.py", "--init", world["renamed"], "--arch_config", world["sam_json"],
                      "--out", out, "--iterations", "1", "--no_progress")
    assert_one_line_error(proc, "pretrain_generalist.py", "renamed_sam.pth", "unexpected keys")
    assert snapshot(world["root"]) == before


def test_make_phantoms_demo_and_processing_report_bad_settings(world, tmp_path):
    proc = run_script("make_phantoms.py", "--out", tmp_path / "ph", "--size", "8", "8", "8")
    assert_one_line_error(proc, "make_phantoms.py", "size must be 3 integers >= 24")
    proc = run_script("demo.py", "--quick", "--patch_size", "40", "40", "40", "--out", tmp_path / "demo")
    assert_one_line_error(proc, "demo.py", "--patch_size")
    proc = run_script("-m dataloaders.la_heart_processing", "--src", tmp_path / "raw", "--dst", tmp_path / "out")
    assert_one_line_error(proc, "la_heart_processing.py", "raw data folder not found", str(tmp_path / "raw"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- in process
def test_run_entry_prints_project_errors_in_one_line_and_lets_bugs_through(capsys):
    def refuse():
        raise DataError("case 'X' (a/b.h5):\n  label holds values {2}\n")

    with pytest.raises(SystemExit) as stop:
        run_entry(refuse, prog="tool.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "tool.py: error: case 'X' (a/b.h5): label holds values {2}\n"
    assert run_entry(lambda: 7, prog="tool.py") == 7

    def bug():
        raise RuntimeError("index out of range in our own code")

    with pytest.raises(RuntimeError, match="our own code"):   # unexpected: propagates, traceback and all
        run_entry(bug, prog="tool.py")
    assert capsys.readouterr().err == ""


def test_project_errors_keep_their_builtin_types():
    from dataloaders.la_heart import LADataError
    from networks.sam_med3d import GeneralistCheckpointError, GeneralistCheckpointNotFoundError
    from training.engine import NonFiniteLossError
    from training.state import TrainStateError
    from utils.inference import CheckpointError
    assert issubclass(ConfigError, ValueError) and issubclass(LADataError, ValueError)
    assert issubclass(GeneralistCheckpointNotFoundError, FileNotFoundError)
    assert issubclass(TrainStateError, CheckpointError) and issubclass(NonFiniteLossError, RuntimeError)
    for cls in (ConfigError, LADataError, GeneralistCheckpointError, TrainStateError, CheckpointError,
                NonFiniteLossError):
        assert issubclass(cls, ProjectError)
    assert one_line("a\n\n  b \n c") == "a b c"
