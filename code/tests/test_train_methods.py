"""Every method runs a few iterations on real LA cases through the one engine; outputs are checked.

Weights are checked at each iteration against their formulas with a short ramp (blocks of 1 iteration,
ramp length 4) so they change from step to step; the logged total equals the weighted sum of the terms.
"""
import math
import struct

import numpy as np
import pytest
import torch

from networks.sam_med3d import GeneralistCheckpointError
from networks.vnet import VNet
from training.engine import Trainer
from training.config import parse_config
from training.run import main
from training.timing import SECTIONS, SectionTimer
from utils import ramps
from utils.generalist import TIMER_SECTIONS
from utils.inference import load_specialist
from tests.conftest import cpu_training_amp

from test_train_common import (one_thread,  # noqa: F401 (autouse)
                               read_iteration_lines, run_args, sam_args, write_tiny_sam, write_train_list)

SHORT_RAMPS = dict(rampup_block=1, consistency_rampup=4.0, sam_rampdown=4.0)
ITERS = 3


@pytest.fixture(scope="module")
def setup(la_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    sam_a, cfg_json = write_tiny_sam(folder, seed=0, name="sam_a.pth")
    sam_b, _ = write_tiny_sam(folder, seed=1, name="sam_b.pth")
    return dict(folder=folder, train_list=write_train_list(folder, la_root), sams=(sam_a, sam_b), cfg_json=cfg_json)


def _events(folder):
    """(tag, kind) pairs of the TensorBoard event files under ``folder`` (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    files = sorted(folder.glob("events.out.tfevents.*"))
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            tags |= {(v.tag, v.WhichOneof("value")) for v in ev.summary.value}
    return files, tags


METHODS = {
    # name: (settings, extra flags, n generalists)
    "sup": (dict(specialist="none", generalist_term="none"), [], 0),
    "sup_all_labeled_batch": (dict(specialist="none", generalist_term="none"), ["--labeled_bs", "4"], 0),
    "mt": (dict(specialist="mt", generalist_term="none"), [], 0),
    "uamt": (dict(specialist="uamt", generalist_term="none"), ["--uamt_passes_per_forward", "3"], 0),
    "semisam": (dict(specialist="mt", generalist_term="semisam", prompt="point"), [], 1),
    "semisam_plus_point": (dict(specialist="mt", generalist_term="semisam_plus", prompt="point"), [], 1),
    "semisam_plus_mask": (dict(specialist="uamt", generalist_term="semisam_plus", prompt="mask"), [], 2),
    "semisam_plus_unc": (dict(specialist="none", generalist_term="semisam_plus", prompt="unc"), [], 2),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_with_expected_terms_weights_and_outputs(name, setup, la_data_dir, tmp_path):
    settings, extra, n_gen = METHODS[name]
    args = run_args(la_data_dir, setup["train_list"], tmp_path, name, *extra, iters=ITERS) + ["--save_every", "2"]
    if n_gen:
        args += sam_args(setup["sams"][:n_gen], setup["cfg_json"])
    trainer = main({**settings, **SHORT_RAMPS}, args)
    out = tmp_path / name
    assert trainer.iteration == ITERS

    # per-iteration log lines: finite terms, weights equal their formulas, total = weighted sum
    rows = read_iteration_lines(out / "log.txt")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        t = r["iteration"] - 1
        assert all(math.isfinite(v) for v in r.values()), r
        w_c = 0.1 * ramps.sigmoid_rampup(t, 4) if settings["specialist"] != "none" else 0.0
        w_s = 0.1 * ramps.sigmoid_rampup(ITERS - t, 4) if n_gen else 0.0
        assert r["weights/consistency"] == pytest.approx(w_c, rel=1e-5, abs=1e-12)
        assert r["weights/generalist"] == pytest.approx(w_s, rel=1e-5, abs=1e-12)
        assert r["train/lr"] == pytest.approx(0.01)
        assert ("consistency" in r) == (settings["specialist"] != "none")
        assert ("generalist" in r) == bool(n_gen)
        assert ("uncertainty/mask_fraction" in r) == (settings["specialist"] == "uamt")
        assert r["supervised"] == pytest.approx(0.5 * (r["ce"] + r["dice"]), rel=1e-4)
        expected = r["supervised"] + w_c * r.get("consistency", 0.0) + w_s * r.get("generalist", 0.0)
        assert r["total"] == pytest.approx(expected, rel=1e-4)
        if n_gen:
            assert 0.0 <= r["generalist/dice_vs_student"] <= 1.0
            conf = r["generalist/mean_confidence"]
            assert conf == 1.0 if (n_gen == 1 and settings["prompt"] != "unc") else 0.0 <= conf <= 1.0
    if n_gen == 2:
        assert any(r["generalist/mean_confidence"] < 1.0 for r in rows)   # two random SAMs disagree

    # outputs: checkpoints load strictly into VNet and through test_LA's loader, events were written
    names = {p.name for p in out.iterdir()}
    assert {"iter_2.pth", "iter_3.pth", "train_state.pth", "config.json", "log.txt", "log"} <= names
    sd = torch.load(out / "iter_3.pth", weights_only=True)
    net = VNet(n_filters=4, has_dropout=True)
    net.load_state_dict(sd, strict=True)
    for k, v in trainer.student.state_dict().items():
        assert torch.equal(sd[k], v)
    for path in (out / "iter_3.pth", out / "train_state.pth"):
        loaded, config = load_specialist(path)
        assert config["n_filters"] == 4
        assert torch.equal(loaded.state_dict()["out_conv.weight"], sd["out_conv.weight"])
    state = torch.load(out / "train_state.pth", weights_only=True)
    assert state["iteration"] == ITERS and state["config"]["vnet"]["n_filters"] == 4
    assert (state["teacher"] is None) == (settings["specialist"] == "none")
    files, tags = _events(out / "log")
    assert len(files) == 1
    assert {("loss/total", "simple_value"), ("train/lr", "simple_value"), ("weights/consistency", "simple_value"),
            ("labeled/image", "image"), ("labeled/prediction", "image")} <= tags
    if n_gen:
        assert {("generalist/dice_vs_student", "simple_value"), ("unlabeled/pseudo_label", "image")} <= tags
    if name.startswith("sup"):
        # the supervised baseline never even loads an unlabeled scan
        assert set(trainer.dataset._cache) <= set(trainer.labeled_idxs)
        batch = next(iter(trainer.make_loader()))
        assert batch["labeled"].tolist() == [True] * trainer.cfg.labeled_bs


def test_missing_generalist_checkpoint_stops_before_training(setup, la_data_dir, tmp_path):
    missing = tmp_path / "no_such_sam.pth"
    args = run_args(la_data_dir, setup["train_list"], tmp_path, "missing") + \
        ["--generalist", str(missing), "--generalist_arch", str(setup["cfg_json"])]
    with pytest.raises(GeneralistCheckpointError) as err:
        main({"specialist": "mt", "generalist_term": "semisam"}, args)
    assert isinstance(err.value, FileNotFoundError) and "no_such_sam.pth" in str(err.value)
    # checked before the run folder is created: a refused run writes nothing (the entry point prints the error)
    assert not (tmp_path / "missing").exists()
    # without a generalist term the same flag is irrelevant: '--generalist none' trains
    trainer = main({"specialist": "mt", "generalist_term": "semisam"},
                   run_args(la_data_dir, setup["train_list"], tmp_path, "no_gen", iters=1) + ["--generalist", "none"])
    assert trainer.method.generalist.name == "none" and trainer.term_generator is None and trainer.iteration == 1


def test_timed_sections_bf16_and_channels_last(setup, la_data_dir, tmp_path):
    """A plugged timer sees every section, the generalist's included; the bf16 autocast, channels_last_3d and activation checkpointing
    paths train finitely."""
    timer = SectionTimer()
    # patch depth 48 (run_args' 32 puts a V-Net level at depth 2, refused for bf16: training/amp_check.py);
    # resample: a 48 patch does not fit the tiny SAM's 32^3 input
    # bf16 where this CPU has it natively; elsewhere the scripts refuse it (tests/test_amp_check.py)
    args = run_args(la_data_dir, setup["train_list"], tmp_path, "amp", "--amp", cpu_training_amp(), "--channels_last", "1",
                    "--checkpoint_levels", "1", "--patch_size", "48", "32", "16", "--geometry", "resample", iters=2) + sam_args(setup["sams"][:1], setup["cfg_json"])
    trainer = main({"specialist": "uamt", "generalist_term": "semisam"}, args, timer=timer)
    # the engine passes its timer to the generalist, whose sub-sections it then reports too
    assert set(timer.summary()) == set(SECTIONS) | set(TIMER_SECTIONS)
    assert timer.counts["student_forward"] == 2 and timer.counts["uncertainty"] == 2
    assert all(math.isfinite(v) for v in trainer.last_result.values.values())
    assert trainer.student.block_one.conv[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert trainer.student.checkpoint_levels == 1 and trainer.teacher.checkpoint_levels == 1


def test_validation_selects_best_model(setup, la_root, la_data_dir, tmp_path):
    val_list = tmp_path / "val.list"
    val_list.write_text(read_case(la_root, 10) + "\n")
    args = run_args(la_data_dir, setup["train_list"], tmp_path, "val", iters=2) + \
        ["--val_list", str(val_list), "--val_every", "1", "--val_stride_xy", "48", "--val_stride_z", "24"]
    trainer = main({"specialist": "mt"}, args)
    out = tmp_path / "val"
    log = (out / "log.txt").read_text()
    assert log.count("validation at iteration") == 2
    best = trainer.best
    assert best is not None and 0.0 <= best["dice"] <= 1.0 and best["iteration"] in (1, 2)
    net = VNet(n_filters=4)
    net.load_state_dict(torch.load(out / "best_model.pth", weights_only=True), strict=True)
    assert torch.load(out / "train_state.pth", weights_only=True)["best"] == best
    _, tags = _events(out / "log")
    assert ("val/dice", "simple_value") in tags


def read_case(la_root, index):
    return [s.strip() for s in (la_root / "train.list").read_text().splitlines() if s.strip()][index]


def test_trainer_step_api_for_benchmarks(setup, la_data_dir, tmp_path):
    """Trainer(cfg) + make_loader() + train_step(batch): the building blocks a benchmark drives."""
    cfg = parse_config({"specialist": "uamt"}, run_args(la_data_dir, setup["train_list"], tmp_path, "api"))
    trainer = Trainer(cfg, timer=SectionTimer())
    batch = next(iter(trainer.make_loader()))
    assert batch["image"].shape == (4, 1, 32, 32, 16) and batch["labeled"].tolist() == [True, True, False, False]
    # channels_last 'auto' on CPU: channels_last_3d student and teacher; '0' turns it off
    assert cfg.channels_last is None and trainer.memory_format == torch.channels_last_3d
    assert trainer.teacher.block_one.conv[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    off = parse_config({"specialist": "uamt"}, run_args(la_data_dir, setup["train_list"], tmp_path, "api0") +
                       ["--channels_last", "0"])
    assert off.channels_last is False
    # unlabeled rows carry no label information at all
    assert batch["label"][2:].abs().sum() == 0
    before = trainer.student.out_conv.weight.detach().clone()
    result = trainer.train_step(batch)
    assert result.iteration == 0 and trainer.iteration == 1
    assert not torch.equal(before, trainer.student.out_conv.weight)
    assert np.isfinite(result.loss) and result.visuals is not None
    trainer.out.close()


def test_tensorboard_writer_fallbacks(setup, la_data_dir, tmp_path, monkeypatch):
    """Without tensorboardX (e.g. the GPU image) torch's SummaryWriter is used; without either the run still
    trains and says so in log.txt."""
    import sys
    import types
    from training import outputs
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = type("FakeWriter", (), {})
    monkeypatch.setitem(sys.modules, "tensorboardX", None)            # import raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    assert outputs._summary_writer_class() is fake.SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert outputs._summary_writer_class() is None
    trainer = main({"specialist": "mt"}, run_args(la_data_dir, setup["train_list"], tmp_path, "no_tb", iters=1))
    assert trainer.iteration == 1
    out = tmp_path / "no_tb"
    assert "no TensorBoard events are written" in (out / "log.txt").read_text()
    assert not list(out.glob("log/events.*")) and (out / "iter_1.pth").exists()


def test_every_case_labeled_supervised_runs_and_semi_supervised_refuses(setup, la_data_dir, tmp_path):
    """labeled_num may be the whole list (the upper bound of 'any count from 1 to N') for the supervised
    baseline; a semi-supervised method then has no unlabeled case and says so."""
    n = len(setup["train_list"].read_text().split())
    args = run_args(la_data_dir, setup["train_list"], tmp_path, "all", iters=2)
    args[args.index("--labeled_num") + 1] = str(n)
    cfg = parse_config({"specialist": "none", "generalist_term": "none"}, args)
    trainer = Trainer(cfg)
    assert trainer.unlabeled_idxs == [] and trainer.labeled_idxs == list(range(n))
    batch = next(iter(trainer.make_loader()))
    assert batch["labeled"].tolist() == [True, True]
    assert np.isfinite(trainer.train_step(batch).loss)
    trainer.out.close()
    with pytest.raises(ValueError, match=rf"labeled_num={n} leaves no unlabeled case"):
        Trainer(parse_config({"specialist": "mt", "generalist_term": "none"}, args))
