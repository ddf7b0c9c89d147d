"""Where and how things run: device choice, autocast, seeds, and a description of the machine.

Used by the training engine, inference, the generalist branch, the demo and the benchmarks alike, so that a
flag such as ``--device cuda`` or ``--amp bf16`` means the same in every script.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
from pathlib import Path
from typing import ContextManager, Iterable, Optional

import numpy as np
import torch

from utils.errors import ConfigError

__all__ = ["DeviceError", "apply_threads", "autocast", "cpu_flags", "default_threads", "derived_seed", "loadavg",
           "machine_info", "mem_available_bytes", "peak_rss_bytes", "resolve_device", "seed_everything"]


class DeviceError(ConfigError):
    """A device name that is not a torch device, or one this machine does not have."""


# ----------------------------------------------------------------------------------------------- device
def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """The torch device a ``--device`` value names, checked against this machine.

    'auto' -> CUDA if available else CPU; a bare 'cuda' (or 'auto' finding CUDA) -> ``cuda:<local_rank>``
    (under torchrun each rank takes its own GPU); anything else as torch parses it. Raises
    :class:`DeviceError` for a string torch does not parse, a CUDA device without CUDA, or a CUDA index this
    machine does not have.
    """
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        text = f"cuda:{int(local_rank)}"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {str(name)!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(name)!r} requested but CUDA is not available on this machine; "
                              f"use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {str(name)!r}: this machine has {count} CUDA device(s) (cuda:0 to "
                              f"cuda:{count - 1})")
    return device


# ---------------------------------------------------------------------------------------------- autocast
def autocast(device: torch.device | str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype`` (e.g. torch.bfloat16); ``None``: autocast OFF.

    Off is explicit (``enabled=False``), not a no-op: a region asked to run in float32 stays float32 even
    inside a caller's autocast region.
    """
    device_type = torch.device(device).type
    # the dtype given to a disabled autocast is never used; bfloat16 is one every device type accepts
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, independent across distinct ``parts`` (numpy SeedSequence).

    E.g. ``derived_seed(seed, rank, iteration)``: every stream of a run is a pure function of the run's seed
    and its own key, which is what makes a resumed run repeat an uninterrupted one. Changing this function
    changes every derived stream, so training results and resume bit-identity depend on it staying as is.
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------- threads
def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(requested: int = 0, share: int = 1) -> int:
    """``requested`` when > 0, else the cores left idle by the current load (1-minute load average), divided
    among ``share`` processes (e.g. the ranks of one machine), at least 1.

    On a shared machine, more compute threads than idle cores makes torch's spinning OpenMP threads fight the
    other processes, and a step becomes many times slower than with fewer threads (results/history.md,
    "Numbers moved out of code comments"); torch's own default takes every core whatever the load.
    """
    if requested > 0:
        return int(requested)
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    idle = max(1, min(cores, int(cores - load + 0.5)))
    return max(1, idle // max(1, int(share)))


def apply_threads(requested: Optional[int], share: int = 1) -> tuple[int, str]:
    """Set torch's intra-op thread count to ``requested`` (>= 1), or with None / 0 to
    :func:`default_threads`; returns (threads, a phrase saying how they were chosen) for the log. Call it
    before any tensor work: torch's thread pool keeps the count it first starts with on some builds."""
    if requested is not None and int(requested) < 0:
        raise ConfigError(f"--threads must be >= 0 (0: the cores left idle by the current load), got {requested}")
    if requested:
        threads, how = int(requested), "--threads"
    else:
        threads = default_threads(share=share)
        how = (f"the cores left idle by the load ({usable_cores()} usable, 1-minute load average "
               f"{(loadavg() or ['?'])[0]}" + (f", shared by {share} processes" if share > 1 else "") + ")")
    torch.set_num_threads(threads)
    return threads, f"{threads} torch thread(s): {how}"


# ----------------------------------------------------------------------------------------------- memory
def mem_available_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """The kernel's estimate of memory available to new work without swapping (MemAvailable), or None where
    ``/proc/meminfo`` does not report it (not Linux, old kernels)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split(":", 1)[1].split()[:2]
                return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes(status: str = "/proc/self/status") -> Optional[int]:
    """This process's peak resident memory (``VmHWM`` of ``/proc/self/status``; since the last reset through
    ``/proc/self/clear_refs``), bytes, or None where the kernel does not report it (not Linux)."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------------------------------------- machine
def loadavg() -> Optional[list[float]]:
    """The 1, 5 and 15-minute load averages, as ``/proc/loadavg`` shows them (None where not reported)."""
    try:
        return [round(float(v), 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: Iterable[str]) -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``) that start with one of ``wanted``, sorted; [] elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if any(f.startswith(w) for w in wanted))


def machine_info(device: Optional[torch.device | str] = None) -> dict:
    """What a result was measured on: date (UTC), platform, CPU and its bf16-relevant flags, cores (all and
    usable by this process), torch and its thread count, load average, and the GPU when ``device`` is CUDA."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(["avx512_bf16", "amx", "avx512f", "avx2"]),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version())
    return info
