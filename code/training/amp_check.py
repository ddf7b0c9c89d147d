"""A probe for a platform defect of bfloat16 3-D convolutions, run before a ``--amp bf16`` training starts.

On this project's CPU machine (AMD EPYC with AVX-512 bf16, no AMX; torch 2.13's oneDNN) the bfloat16
weight gradient of a 3x3x3, padding-1 Conv3d is wrong (values up to 1e36, different on every call) whenever
the input depth (first spatial axis) is exactly 2, while the forward pass, the input gradient and the other
depths we tried (1, 3 to 8) are right. The V-Net halves the depth four times, so a patch depth of 16
or 32 puts a level at depth 2 and bf16 training would silently follow garbage gradients. We probe the device
once with a small convolution at each depth the patch will meet and refuse such runs with a clear message.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from utils.bf16 import require_native_bf16
from utils.errors import ConfigError

# relative max error of a bf16 gradient against float32 that is still rounding (measured ~0.004)
_TOLERANCE = 0.05


def bf16_conv_weight_grad_ok(depth: int, device: torch.device | str = "cpu",
                             memory_format: torch.memory_format = torch.contiguous_format,
                             backward: Callable = torch.ops.aten.convolution_backward) -> bool:
    """True when the bf16 weight gradient of a 16 -> 16 channel 3x3x3 conv on a (2, 16, depth, 6, 5) input
    matches float32 to rounding, twice in a row (the defect returns uninitialised memory). ``backward`` is
    ATen's convolution backward (replaceable in tests)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, depth, 6, 5, generator=g).to(device).contiguous(memory_format=memory_format)
    grad = torch.randn(2, 16, depth, 6, 5, generator=g).to(device).contiguous(memory_format=memory_format)
    w = (0.1 * torch.randn(16, 16, 3, 3, 3, generator=g)).to(device).contiguous(memory_format=memory_format)

    def weight_grad(dtype: torch.dtype) -> torch.Tensor:
        return backward(
            grad.to(dtype), x.to(dtype), w.to(dtype), [16], [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1,
            [False, True, False])[1].float()

    ref = weight_grad(torch.float32)
    scale = ref.abs().max()
    return all(bool(((weight_grad(torch.bfloat16) - ref).abs().max() <= _TOLERANCE * scale).item())
               for _ in range(2))


def vnet_level_depths(patch_depth: int, levels: int = 5) -> list[int]:
    """Input depths the V-Net's 3x3x3 convolutions see: patch_depth / 2**k for k = 0..levels-1."""
    return [patch_depth // 2 ** k for k in range(levels)]


def check_bf16_training(patch_size: Iterable[int], device: torch.device,
                        memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Raise ConfigError (a ValueError) when a bf16 V-Net training at ``patch_size`` would be emulated (a CPU
    without native bfloat16: :class:`utils.bf16.NoNativeBf16Error`) or hit the defect on ``device``."""
    require_native_bf16(device)
    patch = tuple(int(s) for s in patch_size)
    for level, depth in enumerate(vnet_level_depths(patch[0])):
        if not bf16_conv_weight_grad_ok(depth, device, memory_format):
            raise ConfigError(
                f"--amp bf16 is unsafe here: this device's bfloat16 3-D convolution ({device}) returns wrong "
                f"weight gradients for inputs of depth {depth}, which V-Net level {level} of patch_size {patch} "
                f"has (a convolution-kernel defect; see training/amp_check.py). Use a patch depth whose levels avoid "
                f"{depth} (e.g. 48, 64, 80, 112 or 128) or --amp none.")


def check_bf16_validation(device: torch.device) -> None:
    """Run validation's bf16 inference path (``utils.inference.sliding_window_predict``: on CPU the folded,
    fused oneDNN copy of the network) once on a tiny V-Net, so that a device that cannot run it stops the run
    before its first iteration instead of at its first validation. Raises ConfigError; leaves every random
    stream as it was (the run's trajectory does not depend on whether it validates)."""
    from networks.vnet import VNet
    from utils.inference import sliding_window_predict
    require_native_bf16(device, "--amp bf16 (validation)")
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        net = VNet(n_channels=1, n_classes=2, n_filters=2, normalization="batchnorm").to(device)
        try:
            sliding_window_predict(net, torch.zeros(16, 16, 16).numpy(), (16, 16, 16), 16, 16,
                                   amp_dtype=torch.bfloat16, device=device)
        except RuntimeError as err:
            raise ConfigError(f"--amp bf16 with --val_every: this device ({device}) cannot run validation's "
                              f"bfloat16 inference ({str(err).splitlines()[0]}); use --amp none") from None
