"""V-Net specialist with UA-MT's exact layout and state-dict key names.

The module tree mirrors ``yulequan/UA-MT`` ``code/networks/vnet.py`` (identical to SemiSAM's copy), so a
plain ``state_dict()`` of this class loads into the official class and vice versa, key for key and in
the same order:

    block_one      ConvBlock(1 stage,  C_in -> F)      block_one_dw   Conv k2 s2   F  -> 2F
    block_two      ConvBlock(2 stages, 2F)             block_two_dw   Conv k2 s2   2F -> 4F
    block_three    ConvBlock(3 stages, 4F)             block_three_dw Conv k2 s2   4F -> 8F
    block_four     ConvBlock(3 stages, 8F)             block_four_dw  Conv k2 s2   8F -> 16F
    block_five     ConvBlock(3 stages, 16F)  [Dropout3d(0.5)]
    block_five_up  ConvT k2 s2 16F -> 8F  (+ block_four output)   block_six   ConvBlock(3 stages, 8F)
    block_six_up   ConvT k2 s2 8F -> 4F   (+ block_three output)  block_seven ConvBlock(3 stages, 4F)
    block_seven_up ConvT k2 s2 4F -> 2F   (+ block_two output)    block_eight ConvBlock(2 stages, 2F)
    block_eight_up ConvT k2 s2 2F -> F    (+ block_one output)    block_nine  ConvBlock(1 stage, F)
    [Dropout3d(0.5)]  out_conv 1x1x1 conv F -> n_classes (logits)

Every block keeps its layers in a ``Sequential`` called ``conv``: a stage is conv (3x3x3, pad 1, bias),
optional norm, ReLU, so with a norm the stage-s conv sits at ``conv.{3s}`` and the norm at
``conv.{3s+1}``; with ``normalization='none'`` the conv sits at ``conv.{2s}``. InstanceNorm3d (affine
False, no running stats) occupies a slot but owns no state-dict entries. GroupNorm uses 16 groups, so
it needs channel counts divisible by 16 (n_filters a multiple of 16).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
GROUPNORM_GROUPS = 16
# Four stride-2 downsamplings: every spatial size must be divisible by 2**4.
SIZE_MULTIPLE = 16


def _norm_layer(normalization: str, channels: int) -> nn.Module | None:
    if normalization == "batchnorm":
        return nn.BatchNorm3d(channels)
    if normalization == "groupnorm":
        if channels % GROUPNORM_GROUPS:
            raise ValueError(f"normalization='groupnorm' uses {GROUPNORM_GROUPS} groups, so every channel count "
                             f"must be divisible by {GROUPNORM_GROUPS}; got {channels} channels "
                             f"(use n_filters a multiple of 16)")
        return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=channels)
    if normalization == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if normalization == "none":
        return None
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


def _stage(layer: nn.Module, normalization: str, channels: int) -> list[nn.Module]:
    """One conv (or deconv) + optional norm + ReLU, as the official Sequential slots."""
    norm = _norm_layer(normalization, channels)
    return [layer] + ([norm] if norm is not None else []) + [nn.ReLU(inplace=True)]


class ConvBlock(nn.Module):
    """``n_stages`` x (Conv3d 3x3x3 pad 1 -> norm -> ReLU); (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)."""

    def __init__(self, n_stages: int, n_filters_in: int, n_filters_out: int, normalization: str = "none"):
        super().__init__()
        ops: list[nn.Module] = []
        for i in range(n_stages):
            c_in = n_filters_in if i == 0 else n_filters_out
            ops += _stage(nn.Conv3d(c_in, n_filters_out, 3, padding=1), normalization, n_filters_out)
        self.conv = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Conv3d k2 s2 -> norm -> ReLU; (B, C_in, X, Y, Z) -> (B, C_out, X/2, Y/2, Z/2)."""

    def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2, normalization: str = "none"):
        super().__init__()
        conv = nn.Conv3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_stage(conv, normalization, n_filters_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ConvTransposeSummedBias(torch.autograd.Function):
    """``F.conv_transpose3d`` whose backward takes the bias gradient as a plain sum of the output gradient.

    PyTorch's CPU backward of a transposed convolution (2.13, oneDNN, channels_last_3d) spends most of its time
    on the bias gradient, which as a plain ``grad.sum((0, 2, 3, 4))`` costs a small fraction of that
    (measured for the V-Net's last upsampling in results/README.md, "Fourth CPU pass", item 2). The input and
    weight gradients still come from ``aten.convolution_backward`` (bit for bit the native ones); the bias
    gradient is the same sum in another order (rounding differences only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, output_padding, groups, dilation)
        return F.conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(stride), list(padding), list(dilation), True, list(output_padding),
                groups, [need_x, need_w, False])
        if need_b:
            grad_b = grad.sum(dim=(0, *range(2, grad.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None, None


class ConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` (same parameters, state-dict keys and forward) with a faster CPU backward
    (:class:`_ConvTransposeSummedBias`), which makes a CPU training step's backward faster in fp32 and more so in
    bf16 (results/README.md, "Fourth CPU pass", item 2). Elsewhere (CUDA, no autograd, ``output_size``) it is the
    plain module.
    Under autocast it casts input, weight and bias to the autocast dtype as autocast does for
    ``conv_transpose3d``."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.device.type != "cpu" or output_size is not None or not torch.is_grad_enabled():
            return super().forward(x, output_size)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return _ConvTransposeSummedBias.apply(x, weight, bias, self.stride, self.padding, self.output_padding,
                                                  self.groups, self.dilation)


class UpsamplingDeconvBlock(nn.Module):
    """ConvTranspose3d k2 s2 -> norm -> ReLU; (B, C_in, X, Y, Z) -> (B, C_out, 2X, 2Y, 2Z)."""

    def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2, normalization: str = "none"):
        super().__init__()
        deconv = ConvTranspose3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
        self.conv = nn.Sequential(*_stage(deconv, normalization, n_filters_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """UA-MT's V-Net. Input (B, n_channels, X, Y, Z) with X, Y, Z divisible by 16 -> logits (B, n_classes, X, Y, Z).

    Args:
        n_channels: input channels (1 for LA MRI).
        n_classes: output channels (logits, no softmax).
        n_filters: width F of the first level; level k has F * 2**k channels.
        normalization: 'batchnorm' | 'groupnorm' (16 groups, F % 16 == 0) | 'instancenorm' | 'none'.
        has_dropout: apply Dropout3d(p=0.5) after block_five and block_nine (active only in train mode
            and when ``forward(..., turnoff_drop=False)``). Adds no state-dict entries.
    """

    def __init__(self, n_channels: int = 1, n_classes: int = 2, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = False):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
        for name, value in (("n_channels", n_channels), ("n_classes", n_classes), ("n_filters", n_filters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.has_dropout = bool(has_dropout)
        f, norm = n_filters, normalization
        # Attribute creation order fixes the state-dict order; it follows the official file.
        self.block_one = ConvBlock(1, n_channels, f, norm)
        self.block_one_dw = DownsamplingConvBlock(f, 2 * f, normalization=norm)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_two_dw = DownsamplingConvBlock(2 * f, 4 * f, normalization=norm)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_three_dw = DownsamplingConvBlock(4 * f, 8 * f, normalization=norm)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_four_dw = DownsamplingConvBlock(8 * f, 16 * f, normalization=norm)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, norm)
        self.block_five_up = UpsamplingDeconvBlock(16 * f, 8 * f, normalization=norm)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_six_up = UpsamplingDeconvBlock(8 * f, 4 * f, normalization=norm)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_seven_up = UpsamplingDeconvBlock(4 * f, 2 * f, normalization=norm)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_eight_up = UpsamplingDeconvBlock(2 * f, f, normalization=norm)
        self.block_nine = ConvBlock(1, f, f, norm)
        self.out_conv = nn.Conv3d(f, n_classes, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)
        self.config = dict(n_channels=n_channels, n_classes=n_classes, n_filters=n_filters,
                           normalization=normalization, has_dropout=self.has_dropout)
        self._checkpoint_levels = 0

    # ------------------------------------------------------------------ activation checkpointing
    @property
    def checkpoint_levels(self) -> int:
        """Resolution levels (0 = full, 1 = half, ...) whose blocks are recomputed in the backward pass
        instead of keeping their activations (default 0: off). A runtime option, not part of the
        architecture: no state-dict entry, same outputs and gradients, BatchNorm running statistics
        updated once per forward as without it."""
        return self._checkpoint_levels

    @checkpoint_levels.setter
    def checkpoint_levels(self, levels: int) -> None:
        if not isinstance(levels, int) or not 0 <= levels <= 5:
            raise ValueError(f"checkpoint_levels must be an int in 0..5, got {levels!r}")
        self._checkpoint_levels = levels

    def _block(self, level: int, fn: Callable[..., torch.Tensor], modules: list[nn.Module],
               *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs), recomputed in backward when ``level`` is checkpointed and autograd records."""
        if level >= self._checkpoint_levels or not torch.is_grad_enabled():
            return fn(*inputs)
        first = [True]

        def run(*xs):
            if first[0]:
                first[0] = False
                return fn(*xs)
            with _frozen_running_stats(modules):  # the recomputation must not update BatchNorm twice
                return fn(*xs)
        # the saved RNG state replays the same Dropout3d mask in the recomputation
        return checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=True)

    def encoder(self, x: torch.Tensor, use_dropout: bool) -> list[torch.Tensor]:
        """(B, C, X, Y, Z) -> features [x1 (F, full), x2 (2F, /2), x3 (4F, /4), x4 (8F, /8), x5 (16F, /16)]."""
        b = self._block
        x1 = b(0, self.block_one, [self.block_one], x)
        x2 = b(1, self.block_two, [self.block_two], b(1, self.block_one_dw, [self.block_one_dw], x1))
        x3 = b(2, self.block_three, [self.block_three], b(2, self.block_two_dw, [self.block_two_dw], x2))
        x4 = b(3, self.block_four, [self.block_four], b(3, self.block_three_dw, [self.block_three_dw], x3))
        x5 = b(4, self.block_five, [self.block_five], b(4, self.block_four_dw, [self.block_four_dw], x4))
        if use_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]

    def decoder(self, features: list[torch.Tensor], use_dropout: bool) -> torch.Tensor:
        """Encoder features -> logits (B, n_classes, X, Y, Z); skips are added, not concatenated."""
        x1, x2, x3, x4, x5 = features
        b = self._block
        x6 = b(3, self.block_six, [self.block_six], b(3, self.block_five_up, [self.block_five_up], x5) + x4)
        x7 = b(2, self.block_seven, [self.block_seven], b(2, self.block_six_up, [self.block_six_up], x6) + x3)
        x8 = b(1, self.block_eight, [self.block_eight], b(1, self.block_seven_up, [self.block_seven_up], x7) + x2)
        x9 = b(0, self.block_nine, [self.block_nine], b(0, self.block_eight_up, [self.block_eight_up], x8) + x1)
        return b(0, lambda t: self.out_conv(self.dropout(t) if use_dropout else t), [], x9)

    def forward(self, x: torch.Tensor, turnoff_drop: bool = False) -> torch.Tensor:
        """x (B, n_channels, X, Y, Z), X/Y/Z divisible by 16 -> logits (B, n_classes, X, Y, Z).

        ``turnoff_drop=True`` disables dropout for this call only (the official code flips
        ``self.has_dropout`` temporarily; we pass a flag instead, which is the same maths and thread-safe).
        """
        check_input_size(x.shape)
        use_dropout = self.has_dropout and not turnoff_drop
        return self.decoder(self.encoder(x, use_dropout), use_dropout)


@contextlib.contextmanager
def _frozen_running_stats(modules: list[nn.Module]):
    """Restore the BatchNorm running statistics (and batch counters) of ``modules`` on exit."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def check_input_size(shape) -> None:
    """Raise ValueError unless ``shape`` is (B, C, X, Y, Z) with X, Y, Z positive multiples of 16."""
    if len(shape) != 5:
        raise ValueError(f"VNet expects a 5-D input (B, C, X, Y, Z), got shape {tuple(shape)}")
    spatial = tuple(int(s) for s in shape[2:])
    if any(s < SIZE_MULTIPLE or s % SIZE_MULTIPLE for s in spatial):
        raise ValueError(f"VNet needs every spatial size divisible by {SIZE_MULTIPLE} (4 stride-2 levels), "
                         f"got spatial size {spatial}")


_CONV_INDEX = re.compile(r"^block_two\.conv\.(\d+)\.weight$")


def vnet_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Infer VNet kwargs from a UA-MT-style state dict (no ``module.`` prefix).

    Returns dict(n_channels, n_classes, n_filters, normalization). ``has_dropout`` leaves no trace in a
    state dict and is not returned. Normalization is read from the keys:
      - ``*.running_mean`` present -> 'batchnorm';
      - norm weights (``block_one.conv.1.weight``) without running stats -> 'groupnorm';
      - otherwise only convs own weights, and the slot stride tells the rest: block_two's second conv
        at ``conv.3`` -> 'instancenorm' (parameter-free norm in slot 1), at ``conv.2`` -> 'none'.
    Raises KeyError naming the missing key when ``sd`` is not a V-Net state dict.
    """
    required = ("block_one.conv.0.weight", "out_conv.weight", "block_two.conv.0.weight")
    for key in required:
        if key not in sd:
            sample = ", ".join(list(sd)[:5])
            raise KeyError(f"not a UA-MT VNet state dict: missing key {key!r} (first keys: {sample})")
    first = sd["block_one.conv.0.weight"]
    n_filters, n_channels = int(first.shape[0]), int(first.shape[1])
    n_classes = int(sd["out_conv.weight"].shape[0])
    if any(k.endswith(".running_mean") for k in sd):
        normalization = "batchnorm"
    elif "block_one.conv.1.weight" in sd:
        normalization = "groupnorm"
    else:
        indices = sorted(int(m.group(1)) for k in sd if (m := _CONV_INDEX.match(k)))
        if indices == [0, 3]:
            normalization = "instancenorm"
        elif indices == [0, 2]:
            normalization = "none"
        else:
            raise KeyError(f"cannot tell the normalization: block_two conv weights at slots {indices}, "
                           f"expected [0, 3] (instancenorm) or [0, 2] (none)")
    return dict(n_channels=n_channels, n_classes=n_classes, n_filters=n_filters, normalization=normalization)
