"""SAM-Med3D mask decoder (official ``MaskDecoder3D``).

Shapes use B = prompt batch, C = ``transformer_dim``, g = token grid, M = ``num_multimask_outputs``
(M + 1 mask tokens), T = 1 + (M + 1) + number of sparse tokens.

Hard-coded as in the official code (not configurable there either): ``TwoWayTransformer3D(depth=2, embedding_dim=C,
mlp_dim=2048, num_heads=8)`` with ReLU and downsample 2 (so C must be divisible by 16), upscaling by
two stride-2 transposed convs (C -> C/4 -> C/8), hypernetwork MLPs C -> C -> C/8.
"""
from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d
from .transformer import TwoWayTransformer3D

# What MaskDecoder3D.__init__ hard-codes for its transformer (config files record it as 'hard_coded').
TRANSFORMER_DEPTH = 2
TRANSFORMER_MLP_DIM = 2048
TRANSFORMER_NUM_HEADS = 8
TRANSFORMER_ACTIVATION = "ReLU"
TRANSFORMER_DOWNSAMPLE = 2


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder3D(nn.Module):
    """Predicts low-resolution mask logits and IoU scores from image and prompt embeddings.

    Args (keyword-only, as official):
        transformer_dim: C (divisible by 16).
        num_multimask_outputs: M.
        activation: activation class of the upscaling path.
        iou_head_depth / iou_head_hidden_dim: the IoU MLP.
    """

    def __init__(self, *, transformer_dim: int, num_multimask_outputs: int = 3,
                 activation: Type[nn.Module] = nn.GELU, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        if transformer_dim % (TRANSFORMER_NUM_HEADS * TRANSFORMER_DOWNSAMPLE):
            raise ValueError(f"transformer_dim {transformer_dim} must be divisible by 16 "
                             f"({TRANSFORMER_NUM_HEADS} hard-coded heads x downsample {TRANSFORMER_DOWNSAMPLE})")
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(depth=TRANSFORMER_DEPTH, embedding_dim=transformer_dim,
                                               mlp_dim=TRANSFORMER_MLP_DIM, num_heads=TRANSFORMER_NUM_HEADS)
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: ``(B or 1, C, g0, g1, g2)``; a single image is shared by all prompts.
            image_pe: ``(1 or B, C, g0, g1, g2)``.
            sparse_prompt_embeddings: ``(B, N, C)``; dense_prompt_embeddings: ``(B, C, g0, g1, g2)``.
            multimask_output: False -> mask/iou index 0; True -> indices 1..M.
        Returns:
            low_res_masks ``(B, 1 or M, 4g0, 4g1, 4g2)`` logits and iou_pred ``(B, 1 or M)``.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All M + 1 masks ``(B, M+1, 4g0, 4g1, 4g2)`` and IoU scores ``(B, M+1)``."""
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(bs, -1, -1)
        tokens = torch.cat((output_tokens.to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings), dim=1)

        # The official code repeat_interleaves whenever batches differ, which is only right for a
        # batch of 1; anything else would silently mix images and prompts.
        src = _match_batch(image_embeddings, bs, "image_embeddings") + dense_prompt_embeddings
        pos_src = _match_batch(image_pe, bs, "image_pe")
        b, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, x, y, z = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, x * y * z).to(hyper_in.dtype)).view(b, -1, x, y, z)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def _match_batch(t: torch.Tensor, bs: int, name: str) -> torch.Tensor:
    """Expand a batch-1 tensor to ``bs``; refuse other mismatches."""
    if t.shape[0] == bs:
        return t
    if t.shape[0] == 1:
        return t.expand(bs, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]} but the prompts have batch {bs} (expected {bs} or 1)")
