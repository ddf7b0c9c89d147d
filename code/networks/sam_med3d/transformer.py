"""Two-way transformer of the SAM-Med3D mask decoder (official ``TwoWayTransformer3D``).

Shapes use B = batch, T = number of tokens (iou + mask tokens + sparse prompts), C = embedding dim,
g = token grid (image tokens n = g0*g1*g2). Decoder LayerNorms use the torch default eps 1e-5.
"""
from __future__ import annotations

import math
from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, check_attn_impl


class Attention(nn.Module):
    """Multi-head attention with an optional down-projected internal width ``C // downsample_rate``.

    ``attn_impl`` ``'fast'`` uses ``scaled_dot_product_attention``; ``'reference'`` the explicit
    softmax of the official code.

    Shapes: q ``(B, Tq, C)``, k and v ``(B, Tk, C)`` -> ``(B, Tq, C)``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"attention internal dim {self.internal_dim} (= {embedding_dim} // {downsample_rate}) "
                             f"is not divisible by num_heads {num_heads}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.attn_impl = "fast"

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    @staticmethod
    def _recombine_heads(x: torch.Tensor) -> torch.Tensor:
        b, n_heads, n_tokens, c_per_head = x.shape
        return x.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_attn_impl(self.attn_impl)
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        if self.attn_impl == "fast":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
            out = torch.softmax(attn, dim=-1) @ v
        return self.out_proj(self._recombine_heads(out))


class TwoWayAttentionBlock3D(nn.Module):
    """Self-attention of tokens, token->image cross-attention, MLP, image->token cross-attention.

    With ``skip_first_layer_pe`` (first layer) the self-attention output *replaces* the queries
    (no residual, no PE), as in the official code.

    Shapes: queries ``(B, T, C)``, keys ``(B, n, C)``, PEs alike -> (queries, keys).
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock3D` plus a final token->image attention.

    Args:
        depth, embedding_dim (C), num_heads, mlp_dim, activation (MLP), attention_downsample_rate.

    ``forward(image_embedding (B, C, g0, g1, g2), image_pe (B, C, g0, g1, g2), point_embedding (B, T, C))``
    returns ``(queries (B, T, C), keys (B, n, C))``.
    """

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                   activation=activation, attention_downsample_rate=attention_downsample_rate,
                                   skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys
