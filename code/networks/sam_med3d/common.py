"""Building blocks shared by the SAM-Med3D modules.

``LayerNorm3d`` and ``MLPBlock`` keep the official parameter names (``weight``/``bias``,
``lin1``/``lin2``) so real checkpoints load strictly.
"""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

ATTENTION_IMPLS = ("fast", "reference")


class MLPBlock(nn.Module):
    """Two-layer MLP ``lin2(act(lin1(x)))`` acting on the last dimension.

    Used by the image-encoder blocks (GELU) and by the two-way transformer (ReLU).

    Args:
        embedding_dim: input and output width E.
        mlp_dim: hidden width.
        act: activation class (instantiated once).

    Shapes: ``(..., E) -> (..., E)``.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, X, Y, Z)`` volume (official LayerNorm3d).

    ``(x - mean_c) / sqrt(biased_var_c + eps) * weight + bias`` with the variance computed by hand,
    default ``eps=1e-6`` as in the official code (the neck, the mask downscaling and the decoder's
    upscaling all use this default).

    Reduced-precision inputs (autocast, bf16 models) are normalised in float32 and cast back to
    the input dtype; for float32 inputs this is exactly the official computation.

    Shapes: ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        weight = self.weight.float()[:, None, None, None]
        bias = self.bias.float()[:, None, None, None]
        return (weight * x + bias).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Select the attention implementation of every attention module inside ``model``.

    ``'fast'`` (the default of every module) uses ``scaled_dot_product_attention`` and, in the
    image encoder, computes only the real (non-padding) query rows of zero-padded windows;
    ``'reference'`` runs the straightforward official computation (full padded windows, explicit
    softmax). Both give the same numbers up to float rounding.

    Returns ``model`` (for chaining). Raises ``ValueError`` for an unknown ``impl`` or a model
    without attention modules.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    n = 0
    for module in model.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = impl
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} contains no SAM-Med3D attention module")
    return model


def check_attn_impl(impl: str) -> None:
    """Raise ``ValueError`` unless ``impl`` is a known attention implementation name."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
