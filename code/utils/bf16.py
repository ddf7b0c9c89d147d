"""Whether this CPU computes bfloat16 natively, and the one message for ``--amp bf16`` where it does not.

PyTorch's CPU bfloat16 convolutions and matrix products run on oneDNN kernels only when the processor has
AVX-512 (BW, VL and DQ) or AVX-NE-CONVERT (or AMX, which comes with AVX-512); elsewhere, e.g. on the many
AVX2-only x86-64 CPUs, it either emulates bf16 with generic kernels (many times slower than float32, see
results/README.md "CPUs without native bfloat16") or, for oneDNN's fused convolution + ReLU that inference
uses, refuses with a RuntimeError. So:

- inference (``utils.inference.sliding_window_predict``) uses the fused bf16 path only where
  :func:`native_cpu_bf16` is True and otherwise the plain autocast computation (same maths, slower);
- the entry scripts refuse ``--amp bf16`` on such a CPU with :func:`require_native_bf16`'s one-line message
  instead of crashing or running many times slower than without it.

The answer can be forced for tests: ``SEMISAM_CPU_BF16=0`` makes :func:`native_cpu_bf16` False on any CPU, so an
AVX-512 machine exercises the fallbacks. (``ONEDNN_MAX_CPU_ISA=AVX2`` also makes oneDNN, and with it this probe,
behave as on an AVX2-only CPU.)
"""
from __future__ import annotations

import functools
import os

import torch

from utils.errors import ConfigError

FORCE_ENV = "SEMISAM_CPU_BF16"
NO_NATIVE_BF16_TEXT = "this CPU has no native bfloat16 support"


class NoNativeBf16Error(ConfigError):
    """``--amp bf16`` asked for on a CPU without native bfloat16 support."""


@functools.lru_cache(maxsize=None)
def _probe() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    # older/newer builds without the query: try the smallest call that needs the native kernels
    try:
        x = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bfloat16)
        w = torch.zeros(1, 1, 3, 3, 3, dtype=torch.bfloat16)
        torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


def native_cpu_bf16() -> bool:
    """True when this CPU runs bfloat16 convolutions on oneDNN's native kernels (probed once per process;
    ``SEMISAM_CPU_BF16=0`` forces False)."""
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced == "0":
        return False
    if forced not in ("", "auto"):
        raise ValueError(f"{FORCE_ENV}={forced!r}: expected 0 (treat the CPU as having no native bfloat16) or auto")
    return _probe()


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``--amp bf16`` is worth running on ``device``: always on accelerators, natively on CPUs only."""
    return torch.device(device).type != "cpu" or native_cpu_bf16()


def require_native_bf16(device: torch.device | str, option: str = "--amp bf16") -> None:
    """Raise :class:`NoNativeBf16Error` (one line: what, why, what to do) when ``device`` is a CPU without
    native bfloat16."""
    if not bf16_supported(device):
        raise NoNativeBf16Error(
            f"{option}: {NO_NATIVE_BF16_TEXT} (oneDNN needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); "
            f"PyTorch would emulate it, many times slower than float32; use --amp none (float32) here")
