"""utils.runtime (device, autocast, seeds, machine info), utils.report (tables), utils.metrics.binary_dice."""
import random
import warnings

import numpy as np
import pytest
import torch

from utils import runtime
from utils.metrics import binary_dice
from utils.report import markdown_table, text_table


# ----------------------------------------------------------------------------------------------- device
def test_resolve_device_cpu_and_auto(monkeypatch):
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu:-1x"])
def test_resolve_device_rejects_names_torch_does_not_parse(name):
    with pytest.raises(runtime.DeviceError, match="is not a torch device"):
        runtime.resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "auto-cuda"])
def test_resolve_device_refuses_cuda_without_cuda(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if name == "auto-cuda":                 # 'auto' never asks for what is missing
        assert runtime.resolve_device("auto").type == "cpu"
        return
    with pytest.raises(runtime.DeviceError, match="CUDA is not available.*--device cpu"):
        runtime.resolve_device(name)
    assert issubclass(runtime.DeviceError, ValueError)      # entry scripts report ValueErrors in one line


def test_resolve_device_with_cuda_picks_the_rank_and_checks_the_index(monkeypatch):
    # CUDA faked (the test machine may have none): only availability and the device count are asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("auto") == torch.device("cuda:0")
    assert runtime.resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert runtime.resolve_device("cuda:1", local_rank=0) == torch.device("cuda:1")     # explicit index wins
    with pytest.raises(runtime.DeviceError, match="2 CUDA device"):
        runtime.resolve_device("cuda:2")


# ---------------------------------------------------------------------------------------------- autocast
def test_autocast_runs_matmuls_in_the_dtype_or_stays_float32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no 'unsupported dtype' warning for the off case
        with runtime.autocast("cpu", torch.bfloat16):
            assert (a @ b).dtype == torch.bfloat16
        with runtime.autocast(torch.device("cpu"), None):
            assert (a @ b).dtype == torch.float32
        # None is an explicit off: a region asked to stay float32 does so inside a caller's autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with runtime.autocast("cpu", None):
                assert (a @ b).dtype == torch.float32
            assert (a @ b).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- seeds
def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        runtime.seed_everything(2 ** 40 + 5)             # numpy takes the seed modulo 2^32
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_derived_seed_is_the_engines_algorithm_unchanged():
    # pinned: training results and resume bit-identity depend on these numbers
    assert runtime.derived_seed(1337, 0, 7) == int(
        np.random.SeedSequence([1337, 0, 7]).generate_state(1, np.uint64)[0] >> 1)
    assert runtime.derived_seed(1337, 0, 7) == 5871735230338663456
    seeds = {runtime.derived_seed(1337, r, t) for r in range(3) for t in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2 ** 63 for s in seeds)
    assert runtime.derived_seed(1, 2) != runtime.derived_seed(2, 1)


# ----------------------------------------------------------------------------------------------- machine
def test_machine_info_describes_cpu_and_torch():
    info = runtime.machine_info("cpu")
    for key in ("date_utc", "platform", "python", "cpu", "cpu_count", "torch", "torch_threads", "device"):
        assert info[key], key
    assert info["device"] == "cpu" and "gpu" not in info
    assert info["torch_threads"] == torch.get_num_threads()
    assert isinstance(info["cpu_flags"], list)
    assert runtime.machine_info()["cpu"] == info["cpu"] and "device" not in runtime.machine_info()
    load = runtime.loadavg()
    assert load is None or (len(load) == 3 and all(v >= 0 for v in load))


# ------------------------------------------------------------------------------------------- report / dice
def test_markdown_and_text_tables_align_names_left_and_numbers_right():
    table = markdown_table(["name", "value"], [["a", 1], ["bbb", "22"]]).splitlines()
    assert table == ["| name | value |", "|------|------:|", "| a    |     1 |", "| bbb  |    22 |"]
    assert text_table(["name", "value"], [["a", 1], ["bbb", "22"]]).splitlines() == [
        "name  value", "-----------", "a         1", "bbb      22"]


def test_binary_dice_of_arrays_and_tensors():
    a = np.array([1, 1, 0, 0], dtype=np.uint8)
    assert binary_dice(a, torch.tensor([1, 0, 1, 0])) == 0.5
    assert binary_dice(torch.zeros(3), np.zeros(3)) == 1.0                 # both empty
    assert binary_dice(np.array([2, 0]), np.array([True, False])) == 1.0   # any non-zero label is foreground
    with pytest.raises(ValueError, match="shapes differ"):
        binary_dice(np.zeros(3), np.zeros(4))
