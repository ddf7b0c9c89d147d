"""utils.io: crash-safe checkpoint writes, safe reading, prefix stripping, the strict-load report."""
import argparse
import logging
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from utils import io


def _weights(value: float) -> dict:
    return {"w": torch.full((2, 3), value), "b": torch.zeros(3)}


def test_atomic_save_writes_and_replaces_whole_files(tmp_path):
    path = tmp_path / "deeper" / "ckpt.pth"            # missing folders are created
    assert io.atomic_save(_weights(1.0), path) == path
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2, 3))
    io.atomic_save(_weights(2.0), path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.full((2, 3), 2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]      # no temporary file left


def test_atomic_save_fsyncs_the_file_before_the_rename_and_then_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    io.atomic_save(_weights(1.0), path)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]          # data durable before it becomes visible
    if events[0][1] is not None:
        assert events[0][1] is False and events[2][1] is True     # first the file, then its folder


@pytest.mark.parametrize("crash", [OSError("disk full"), KeyboardInterrupt()])
def test_a_writer_dying_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch, crash):
    path = tmp_path / "ckpt.pth"
    io.atomic_save(_weights(1.0), path)
    before = path.read_bytes()

    def dies(obj, f):
        f.write(b"half a checkpoint")          # some bytes reach the temporary file, then the writer dies
        raise crash

    with pytest.raises(type(crash)):
        io.atomic_save(_weights(2.0), path, serializer=dies)
    monkeypatch.setattr(io, "_serialize", dies)        # the module default, as a test of the engine patches it
    with pytest.raises(type(crash)):
        io.atomic_save(_weights(3.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_write_hands_the_writer_a_temporary_path(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text('{"a": 1}\n')
    path = io.atomic_write(tmp_path / "config.json", write)
    assert path.read_text() == '{"a": 1}\n'
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".config.json.tmp") and not seen[0].exists()

    def dies(tmp):
        tmp.write_text("half")
        raise OSError("killed")
    with pytest.raises(OSError, match="killed"):
        io.atomic_write(path, dies)
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_utils_io_does_not_load_torch_for_data_writers():
    # the h5 writers (phantoms, raw-data conversion) use atomic_write without paying for a torch import
    code = "import sys, utils.io; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(io.__file__).resolve().parents[1], check=True)


def test_read_checkpoint_reads_tensors_and_refuses_or_warns_on_pickles(tmp_path, caplog):
    ok = tmp_path / "ok.pth"
    torch.save({"model_state_dict": _weights(1.0), "epoch": 3}, ok)
    assert io.read_checkpoint(ok)["epoch"] == 3

    pickled = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.zeros(1)}, pickled)
    with pytest.raises(io.CheckpointReadError, match=r"pickled.pth holds non-tensor objects.*weights_only=True\)"
                                                     r"; you may not"):
        io.read_checkpoint(pickled, refusal_hint="; you may not")

    class Mine(ValueError):
        pass
    with pytest.raises(Mine, match="my file .*pickled.pth"):
        io.read_checkpoint(pickled, what="my file", error=Mine)
    with caplog.at_level(logging.WARNING, logger=io.log.name):
        assert io.read_checkpoint(pickled, allow_pickle=True)["args"].lr == 0.1
    assert any("weights_only=False" in r.getMessage() and str(pickled) in r.getMessage() for r in caplog.records)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    for allow in (False, True):
        with pytest.raises(io.CheckpointReadError, match="junk.pth"):
            io.read_checkpoint(junk, allow_pickle=allow)
    with pytest.raises(io.CheckpointReadError, match="cannot read checkpoint .*missing.pth"):
        io.read_checkpoint(tmp_path / "missing.pth")


def test_strip_wrapper_prefixes_only_when_every_key_has_one():
    sd = OrderedDict([("a.weight", 1), ("b.bias", 2)])
    assert io.strip_wrapper_prefixes({f"module.{k}": v for k, v in sd.items()}) == sd
    assert io.strip_wrapper_prefixes({f"module._orig_mod.{k}": v for k, v in sd.items()}) == sd
    assert io.strip_wrapper_prefixes({f"_orig_mod.{k}": v for k, v in sd.items()}) == sd
    mixed = {"module.a": 1, "b": 2}
    assert io.strip_wrapper_prefixes(mixed) == mixed
    assert list(io.strip_wrapper_prefixes({"module.z": 1, "module.a": 2})) == ["z", "a"]     # order kept
    assert io.strip_wrapper_prefixes({}) == {}


def test_compare_state_dict_reports_every_kind_of_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    expected = model.state_dict()
    assert not io.compare_state_dict(expected, dict(expected))
    assert str(io.compare_state_dict(expected, dict(expected))) == "all keys fit"

    state = dict(expected)
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    state["extra"] = torch.zeros(1)
    state["0.bias"] = "not a tensor"
    report = io.compare_state_dict(expected, state)
    assert report
    assert report.missing == ["1.bias"] and report.unexpected == ["extra"] and report.not_tensor == ["0.bias"]
    assert report.wrong_shape == ["0.weight [5, 3] (model [4, 3])"]
    assert str(report) == ("1 missing keys: 1.bias; 1 unexpected keys: extra; "
                           "1 keys with wrong shapes: 0.weight [5, 3] (model [4, 3]); 1 non-tensor entries: 0.bias")


def test_key_report_lists_at_most_limit_names():
    report = io.KeyReport(missing=[f"k{i}" for i in range(13)])
    assert str(report) == "13 missing keys: " + ", ".join(f"k{i}" for i in range(10)) + ", ... (3 more)"
