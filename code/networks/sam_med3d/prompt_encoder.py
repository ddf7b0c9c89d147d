"""SAM-Med3D prompt encoder: points and a low-resolution mask -> sparse and dense embeddings.

Shapes use B = batch, N = points per item, E = ``embed_dim``, g = token grid (``image_embedding_size``),
I = ``input_image_size`` (the encoder's input size, patch * g) and 4g = the mask prompt size.

Official behaviour kept (the golden fixtures reproduce only with it):

* the random-Fourier PE produces ``[sin, cos, sin]`` (the sin block is duplicated) from ``E // 3``
  frequencies, so ``E`` must be divisible by 3;
* ``get_dense_pe`` crosses axes: cell (i, j, k) encodes ``((j+0.5)/I0, (i+0.5)/I1, (k+0.5)/I2)``, while a
  point ``(c0, c1, c2)`` (tensor-axis order, as produced by ``argwhere``) encodes ``((c0+0.5)/I0, ...)``;
* with no box prompt a padding point (label -1) is appended: its PE is zeroed and ``not_a_point_embed``
  added; labels 0/1 add ``point_embeddings[0/1]``; any other label adds nothing;
* the mask prompt goes through ``mask_downscaling`` as is (no resize, no sigmoid), so it must be
  exactly ``4 * g`` per axis.

The PE is computed in float32 even under autocast: ``sin(2*pi*...)`` of bf16 products would lose the
phase of the higher frequencies. For float32 inputs this is the official computation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn

from .common import LayerNorm3d

Size3 = Tuple[int, int, int]


class PatchConv3d(nn.Conv3d):
    """The mask prompt's stride-2 convolutions with a fixed rounding order when they have 1 input channel.

    Same parameters and math as ``nn.Conv3d``; in float32 the 8 taps are accumulated one by one in kernel
    order with a fused multiply-add each (exact product, one rounding per tap), then the bias is added.
    Why: the next layer is a LayerNorm3d over only ``mask_in_chans // 4`` channels, whose variance can fall far
    below its eps, where it magnifies the last bit of this convolution about a thousandfold; the library
    convolution's accumulation order differs between CPUs, so the dense mask embedding would differ by up
    to ~4e-5 between machines. With this order the golden fixture (made with the official code) is
    reproduced to 5e-7 on any machine. The second convolution has 1 input channel too when
    ``mask_in_chans == 4``. Several input channels or other dtypes (bf16 autocast) use the library
    convolution.

    Shapes: ``(B, 1, 2a, 2b, 2c) -> (B, C_out, a, b, c)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or self.weight.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
                or self.in_channels != 1 or self.kernel_size != self.stride or any(self.padding)):
            return super().forward(x)
        b, _, X, Y, Z = x.shape
        kx, ky, kz = self.kernel_size
        taps = (x.reshape(b, X // kx, kx, Y // ky, ky, Z // kz, kz)
                .permute(0, 1, 3, 5, 2, 4, 6).reshape(b, 1, X // kx, Y // ky, Z // kz, kx * ky * kz).double())
        w = self.weight.reshape(self.out_channels, kx * ky * kz).double()[None, :, None, None, None]
        acc = torch.zeros(b, self.out_channels, X // kx, Y // ky, Z // kz, dtype=torch.float64, device=x.device)
        for k in range(kx * ky * kz):
            # a float32 FMA: the float32 x float32 product is exact in float64, one rounding to float32
            acc = (acc + taps[..., k] * w[..., k]).float().double()
        return (acc.float() + self.bias[None, :, None, None, None]).contiguous()


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding with a fixed Gaussian matrix ``G`` of shape ``(3, F)``.

    Output channels: ``3 * F`` = ``[sin(2*pi*(2u-1) @ G), cos(...), sin(...)]``.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` coordinates in [0, 1] -> ``(..., 3F)``."""
        with torch.autocast(coords.device.type, enabled=False):
            coords = 2 * coords.float() - 1
            coords = coords @ self.positional_encoding_gaussian_matrix.float()
            coords = 2 * np.pi * coords
            return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Size3) -> torch.Tensor:
        """Dense PE of a grid of ``size = (X, Y, Z)`` cells -> ``(3F, X, Y, Z)`` (axes 0/1 crossed)."""
        x, y, z = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((x, y, z), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / y
        x_embed = (grid.cumsum(dim=1) - 0.5) / x
        z_embed = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([x_embed, y_embed, z_embed], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Size3) -> torch.Tensor:
        """Point PE: ``(B, N, 3)`` coordinates in input-image units -> ``(B, N, 3F)`` (no +0.5 here)."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[0]
        coords[:, :, 1] = coords[:, :, 1] / image_size[1]
        coords[:, :, 2] = coords[:, :, 2] / image_size[2]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder3D(nn.Module):
    """Encodes point and mask prompts (official ``PromptEncoder3D``).

    Args:
        embed_dim: E (divisible by 3).
        image_embedding_size: token grid g as ``(g0, g1, g2)``.
        input_image_size: encoder input size I as ``(I0, I1, I2)``; points are in these units.
        mask_in_chans: hidden channels of the mask downscaling (divisible by 4).
        activation: activation class of the mask downscaling.
    """

    def __init__(self, embed_dim: int, image_embedding_size: Sequence[int], input_image_size: Sequence[int],
                 mask_in_chans: int, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"prompt embed_dim {embed_dim} must be divisible by 3 (the PE has 3*(E//3) channels)")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.num_point_embeddings = 2  # negative, positive
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            PatchConv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            PatchConv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Dense PE of the token grid: ``(1, E, g0, g1, g2)``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 3)``, ``(B, N)`` -> ``(B, N + pad, E)``."""
        points = points + 0.5  # voxel centres
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 3), device=points.device, dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        weights = [e.weight.to(point_embedding.dtype) for e in self.point_embeddings]
        not_a_point = self.not_a_point_embed.weight.to(point_embedding.dtype)
        labels = labels[..., None]
        point_embedding = torch.where(labels == -1, not_a_point, point_embedding)
        point_embedding = point_embedding + (labels == 0) * weights[0] + (labels == 1) * weights[1]
        return point_embedding

    def _check_inputs(self, points, boxes, masks) -> int:
        if boxes is not None:
            raise ValueError("box prompts are not supported: the official PromptEncoder3D box path is "
                             "broken (2-D reshape, only 2 point embeddings); pass boxes=None")
        bs = None
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ValueError("points must be a pair (coords (B, N, 3), labels (B, N))")
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 3 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(f"points must be coords (B, N, 3) and labels (B, N), got "
                                 f"{tuple(coords.shape)} and {tuple(labels.shape)}")
            bs = coords.shape[0]
        if masks is not None:
            expected = (1,) + self.mask_input_size
            if masks.dim() != 5 or tuple(masks.shape[1:]) != expected:
                raise ValueError(f"mask prompt must be (B, {', '.join(map(str, expected))}) (4x the token grid), "
                                 f"got {tuple(masks.shape)}")
            if bs is not None and masks.shape[0] != bs:
                raise ValueError(f"points batch {bs} != masks batch {masks.shape[0]}")
            bs = masks.shape[0] if bs is None else bs
        return 1 if bs is None else bs

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: ``(coords (B, N, 3), labels (B, N))`` in input-image voxel units, tensor-axis order,
                or None.
            boxes: must be None (see :meth:`_check_inputs`).
            masks: ``(B, 1, 4g0, 4g1, 4g2)`` mask logits / binary masks, or None.
        Returns:
            sparse ``(B, N + 1, E)`` (``(B, 0, E)`` without points) and dense ``(B, E, g0, g1, g2)``.
        """
        bs = self._check_inputs(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self._embed_points(points[0], points[1], pad=True)
        else:
            sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
