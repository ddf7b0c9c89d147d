"""SAM-Med3D image encoder: a 3-D ViT with windowed / global attention and decomposed relative positions.

Shapes use B = batch, S = ``img_size``, p = ``patch_size``, g = S // p (token grid), E = ``embed_dim``,
h = ``num_heads``, c = E // h (head dim), w = window size.

Two official quirks are kept because real checkpoints were trained with them (the golden fixtures, outputs of
the official code, reproduce only with them):

* decomposed relative position: for query (d, hh, ww) and key (kd, kh, kw) the logit gets
  ``<q[d,hh,ww], R_d[d,kw]> + <q[d,hh,kd], R_h[hh,kw]> + <q[d,hh,kh], R_w[kh,kw]>``, with
  ``R_a[i, j] = rel_pos_a[i - j + n - 1]`` and unscaled q. All three terms are read along the key's
  w axis and the h / w terms read q at *other* positions (the official broadcast
  ``rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]``).
  Note: the d term looks standard (``R_d[d,kd]``) at first reading of the official code; the golden fixture is
  only reproduced (to 1e-6) with ``R_d[d,kw]``, so that is what is implemented;
* windows are zero-padded after ``norm1`` and attended without a mask, so padding tokens are keys and
  values equal to the qkv bias.

Every ``Attention`` has ``attn_impl``: ``'reference'`` is the official computation over full padded
windows; ``'fast'`` (default) computes only the real query rows, folds all padding keys of a window
(identical k and v = the bias) into one extra key whose logit bias is the log-sum-exp of their rel-pos
terms, and calls ``scaled_dot_product_attention`` with the rel-pos terms as a float mask: same math, fewer
FLOPs (vit_b_ori: 512 query rows x 513 keys instead of 2744 x 2744 per windowed block).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock, check_attn_impl

Size3 = Tuple[int, int, int]


class PatchEmbed3D(nn.Module):
    """Non-overlapping patch embedding: ``Conv3d(in_chans, E, k=p, s=p, padding 0, bias)``.

    Shapes: ``(B, in_chans, S, S, S) -> (B, g, g, g, E)`` (channels last).

    Always float32, also under autocast: oneDNN's bf16 kernel for this one-channel k16 s16 convolution
    was many times slower than float32 on an AVX-512 CPU (a large share of the whole bf16 encoder; measured
    in results/history.md, "Second pass", item 5), and the layer is a small share of the encoder's work
    anyway.
    """

    def __init__(self, kernel_size: Size3 = (16, 16, 16), stride: Size3 = (16, 16, 16),
                 padding: Size3 = (0, 0, 0), in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.proj(x.to(self.proj.weight.dtype)).permute(0, 2, 3, 4, 1)


def window_partition3D(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Size3]:
    """Zero-pad the high end of each axis to a multiple of ``window_size`` and cut cubic windows.

    Windows are ordered row-major over (d, h, w) window indices, tokens row-major inside a window.

    Args:
        x: ``(B, D, H, W, C)``.
    Returns:
        windows ``(B * nW, w, w, w, C)`` and the padded size ``(Dp, Hp, Wp)``.
    """
    B, D, H, W, C = x.shape
    pad_d = (window_size - D % window_size) % window_size
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_d or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    Dp, Hp, Wp = D + pad_d, H + pad_h, W + pad_w
    ws = window_size
    x = x.view(B, Dp // ws, ws, Hp // ws, ws, Wp // ws, ws, C)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, ws, ws, ws, C)
    return windows, (Dp, Hp, Wp)


def window_unpartition3D(windows: torch.Tensor, window_size: int, pad_dhw: Size3, dhw: Size3) -> torch.Tensor:
    """Inverse of :func:`window_partition3D`, dropping the padding.

    Args:
        windows: ``(B * nW, w, w, w, C)``.
        pad_dhw: padded size ``(Dp, Hp, Wp)``; dhw: original size ``(D, H, W)``.
    Returns:
        ``(B, D, H, W, C)``.
    """
    Dp, Hp, Wp = pad_dhw
    D, H, W = dhw
    ws = window_size
    B = windows.shape[0] // ((Dp // ws) * (Hp // ws) * (Wp // ws))
    x = windows.view(B, Dp // ws, Hp // ws, Wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, Dp, Hp, Wp, -1)
    if Dp > D or Hp > H or Wp > W:
        x = x[:, :D, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table ``R[i, j] = rel_pos[i - j + k_size - 1]``.

    The official code would linearly interpolate a table of another length; no shipped config
    (nor any input the encoder accepts, which must be exactly ``img_size``) reaches that branch,
    so it is refused instead of silently resampling.

    Args:
        rel_pos: ``(2n - 1, c)``.
    Returns:
        ``(q_size, k_size, c)``.
    """
    if q_size != k_size or rel_pos.shape[0] != 2 * q_size - 1:
        raise ValueError(
            f"relative-position table of length {rel_pos.shape[0]} does not fit q_size={q_size}, "
            f"k_size={k_size} (expected length {2 * max(q_size, k_size) - 1}, equal sizes)")
    idx = torch.arange(q_size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + (k_size - 1)]


def add_decomposed_rel_pos(attn: torch.Tensor, q: torch.Tensor, rel_pos_d: torch.Tensor,
                           rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           q_size: Size3, k_size: Size3) -> torch.Tensor:
    """Official decomposed relative-position terms, including the h/w broadcast quirk (module doc).

    Args:
        attn: ``(B*h, n, n)`` logits with n = D*H*W; q: ``(B*h, n, c)`` unscaled queries.
    Returns:
        ``(B*h, n, n)``.
    """
    q_d, q_h, q_w = q_size
    k_d, k_h, k_w = k_size
    Rd = get_rel_pos(q_d, k_d, rel_pos_d).to(q.dtype)
    Rh = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_d, q_h, q_w, dim)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, Rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, Rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, Rw)
    # The official index pattern: rel_d's key axis lands on kw, rel_h's query-w axis on kd, rel_w's on kh.
    attn = (attn.view(B, q_d, q_h, q_w, k_d, k_h, k_w)
            + rel_d[:, :, :, :, None, None]
            + rel_h[:, :, :, None, :, None]
            + rel_w[:, :, :, None, None, :]).view(B, q_d * q_h * q_w, k_d * k_h * k_w)
    return attn


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative positions (official ``Attention`` of the encoder).

    Args:
        dim: E; num_heads: h; input_size: the (cubic) window or token-grid size n the rel-pos tables
        are made for (tables ``(2n - 1, c)``, zero-initialised as in the official code, whatever
        ``rel_pos_zero_init`` says).

    ``forward`` is the official per-window computation; ``forward_grid`` does the windowing itself
    and follows ``attn_impl``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: Optional[Size3] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if self.use_rel_pos:
            if input_size is None:
                raise ValueError("input_size must be given when use_rel_pos is True")
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))
        self.attn_impl = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Official computation on already-partitioned windows: ``(B', n, n, n, E) -> (B', n, n, n, E)``."""
        B, D, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, D * H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, D * H * W, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w,
                                          (D, H, W), (D, H, W))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.num_heads, D, H, W, -1).permute(0, 2, 3, 4, 1, 5).reshape(B, D, H, W, -1)
        return self.proj(x)

    def forward_grid(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Attention over the whole token grid, windowed (``window_size > 0``) or global (0).

        Args:
            x: ``(B, D, H, W, E)``, already through ``norm1``.
        Returns:
            ``(B, D, H, W, E)``.
        """
        check_attn_impl(self.attn_impl)
        if self.attn_impl == "fast":
            return self._forward_fast(x, window_size)
        if window_size > 0:
            D, H, W = x.shape[1:4]
            windows, pad_dhw = window_partition3D(x, window_size)
            return window_unpartition3D(self(windows), window_size, pad_dhw, (D, H, W))
        return self(x)

    def _forward_fast(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """``(B, D, H, W, E) -> (B, D, H, W, E)``: SDPA over the real query rows of each window box.

        Only the real tokens go through ``qkv``: zero padding after norm1 makes a padding token's q, k and v
        exactly the qkv bias (zero without one), so the padded window is never built.
        """
        B, D, H, W, E = x.shape
        if window_size > 0:
            n = window_size
        else:
            if not D == H == W:
                raise ValueError(f"global attention needs a cubic token grid, got {(D, H, W)}")
            n = D
        nh, c = self.num_heads, E // self.num_heads
        nwin = tuple(math.ceil(s / n) for s in (D, H, W))
        qkv = self.qkv(x)                                     # (B, D, H, W, 3E), real tokens only
        pad = (self.qkv.bias.to(qkv.dtype) if self.qkv.bias is not None
               else qkv.new_zeros(3 * E)).view(3, nh, c)    # q, k, v of every padding token
        if self.use_rel_pos:
            Rd = get_rel_pos(n, n, self.rel_pos_d)
            Rh = get_rel_pos(n, n, self.rel_pos_h)
            Rw = get_rel_pos(n, n, self.rel_pos_w)
        out = x.new_empty((B, D, H, W, E), dtype=qkv.dtype)
        # Windows along an axis are full except possibly the last one, so the windows sharing the same
        # real extent per axis form a box of windows; each box is one batched SDPA call. A box's real
        # tokens are one contiguous block of the token grid: [d0 * n, d0 * n + (d1 - d0) * ed) along d, etc.
        for (d0, d1, ed), (h0, h1, eh), (w0, w1, ew) in _window_boxes((D, H, W), n, nwin):
            a, b, e = d1 - d0, h1 - h0, w1 - w0
            region = (slice(None), slice(d0 * n, d0 * n + a * ed), slice(h0 * n, h0 * n + b * eh),
                      slice(w0 * n, w0 * n + e * ew))
            # (B, a*ed, b*eh, e*ew, 3E) -> (3, B, a, b, e, heads, ed, eh, ew, c)
            q_real, k_real, v_real = (qkv[region].reshape(B, a, ed, b, eh, e, ew, 3, nh, c)
                                      .permute(7, 0, 1, 3, 5, 8, 2, 4, 6, 9).unbind(0))
            lead = q_real.shape[:5]
            m = ed * eh * ew
            k_keys = k_real.reshape(-1, nh, m, c)
            v_keys = v_real.reshape(-1, nh, m, c)
            padded = m < n ** 3
            if padded:
                # Every padding key / value is the qkv bias: they are folded into one extra key whose
                # logit bias is log sum_pad exp(rel-pos bias).
                k_keys = torch.cat([k_keys, pad[1].view(1, nh, 1, c).expand(k_keys.shape[0], nh, 1, c)], dim=2)
                v_keys = torch.cat([v_keys, pad[2].view(1, nh, 1, c).expand(v_keys.shape[0], nh, 1, c)], dim=2)
            mask = None
            if self.use_rel_pos:
                q_rows = q_real                               # the rows over the whole window w axis
                if ew < n:
                    q_pad = pad[0].view(nh, 1, 1, 1, c).expand(*lead, ed, eh, n - ew, c)
                    q_rows = torch.cat([q_real, q_pad], dim=-2)
                mask = self._rel_pos_mask(q_real, q_rows, Rd[:ed], Rh[:eh], Rw)
                mask = mask.reshape(-1, nh, m, m + padded)
            elif padded:
                mask = q_real.new_zeros((1, m + 1))
                mask[:, -1] = math.log(n ** 3 - m)
            o = F.scaled_dot_product_attention(
                q_real.reshape(-1, nh, m, c), k_keys, v_keys, attn_mask=mask, scale=self.scale)
            o = o.view(*lead, ed, eh, ew, c).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
            out[region] = o.reshape(B, a * ed, b * eh, e * ew, E)
        return self.proj(out)

    @staticmethod
    def _rel_pos_mask(q_real: torch.Tensor, q_rows: torch.Tensor, Rd: torch.Tensor, Rh: torch.Tensor,
                      Rw: torch.Tensor) -> torch.Tensor:
        """Additive logit bias of the real query rows over the real keys and the folded padding key.

        With the official broadcast (module doc) the bias of query (d, h, w) and key (kd, kh, kw) is
        ``a[w, kw] + b[kd, kw] + c[kh, kw]`` (all at the query's d, h), so for every kw the padding keys'
        ``sum exp(bias)`` factorises into per-axis sums. The padding keys of a window with real extent
        (ed, eh, ew) form the disjoint boxes {kd >= ed} u {kd < ed, kh >= eh} u {kd < ed, kh < eh,
        kw >= ew}; each is summed in log space (logsumexp), so nothing is subtracted and nothing overflows.

        Args:
            q_real: ``(..., ed, eh, ew, c)`` real queries; q_rows: ``(..., ed, eh, n, c)`` the same rows over
            the whole window w axis (padding included), which the h / w terms read at w' = kd / kh.
            Rd ``(ed, n, c)``, Rh ``(eh, n, c)``, Rw ``(n, n, c)``.
        Returns:
            ``(..., ed, eh, ew, m [+ 1])``: the m = ed*eh*ew real keys (kd, kh, kw) row-major, then the
            folded padding key's ``log sum_pad exp(bias)`` when the window is padded; in q's dtype.
            Computed in float32 (float64 stays float64), so reduced-precision runs round once.
        """
        ed, eh, ew = q_real.shape[-4:-1]
        n = q_rows.shape[-2]
        acc = torch.promote_types(q_real.dtype, torch.float32)
        with torch.autocast(q_real.device.type, enabled=False):
            rel_d = torch.einsum("...dhwc,dkc->...dhwk", q_real.to(acc), Rd.to(acc))  # a: (..., ed, eh, ew, kw)
            rel_h = torch.einsum("...dhwc,hkc->...dhwk", q_rows.to(acc), Rh.to(acc))  # b: (..., ed, eh, kd, kw)
            rel_w = torch.einsum("...dhwc,wkc->...dhwk", q_rows.to(acc), Rw.to(acc))  # c: (..., ed, eh, kh, kw)
            ab = rel_d[..., None, None, :ew] + rel_h[..., None, :ed, None, :ew]   # (..., ed, 1, ew): small
            c = rel_w[..., None, None, :eh, :ew]
            if (ed, eh, ew) == (n, n, n):
                return (ab + c).flatten(-3).to(q_real.dtype)
            # log sums over kd (b) / kh (c) ranges per kw, (..., ed, eh, 1, n): the same for every query w
            b_lo = rel_h[..., :ed, :].logsumexp(-2, keepdim=True)
            c_lo = rel_w[..., :eh, :].logsumexp(-2, keepdim=True)
            b_all, c_all, pairs = b_lo, c_lo, []      # pairs: padding (kd, kh) sets at a real kw
            if eh < n:
                c_hi = rel_w[..., eh:, :].logsumexp(-2, keepdim=True)
                c_all = torch.logaddexp(c_lo, c_hi)
                pairs.append(b_lo + c_hi)
            if ed < n:
                b_hi = rel_h[..., ed:, :].logsumexp(-2, keepdim=True)
                b_all = torch.logaddexp(b_lo, b_hi)
                pairs.append(b_hi + c_all)
            terms = []                                # (..., ed, eh, ew, k) log terms over kw
            if pairs:
                at_real_kw = pairs[0] if len(pairs) == 1 else torch.logaddexp(pairs[0], pairs[1])
                terms.append(rel_d[..., :ew] + at_real_kw[..., :ew])
            if ew < n:                                # every (kd, kh) is padding at kw >= ew
                terms.append(rel_d[..., ew:] + (b_all + c_all)[..., ew:])
            fold = torch.cat(terms, dim=-1).logsumexp(-1, keepdim=True)
            if torch.is_grad_enabled() and (ab.requires_grad or c.requires_grad):
                mask = torch.cat([(ab + c).flatten(-3), fold], dim=-1)
            else:   # one buffer, written in place: no concatenation copy of the m x m block
                m = ed * eh * ew
                mask = fold.new_empty((*q_real.shape[:-1], m + 1))
                torch.add(ab, c, out=mask[..., :m].unflatten(-1, (ed, eh, ew)))
                mask[..., m:] = fold
        return mask.to(q_real.dtype)


def _window_boxes(dhw: Size3, n: int, nwin: Size3):
    """Yield boxes of windows with equal real extents: ``((d0, d1, ed), (h0, h1, eh), (w0, w1, ew))``.

    Along each axis the first ``k - 1`` windows are full (extent n) and the last one holds the rest;
    window indices ``[a0, a1)`` with extent ``e`` cover tokens ``[a0*n, a0*n + (a1-a0)*e)``.
    """
    per_axis = []
    for size, k in zip(dhw, nwin):
        last = size - (k - 1) * n
        if last == n:
            per_axis.append([(0, k, n)])
        else:
            per_axis.append(([(0, k - 1, n)] if k > 1 else []) + [(k - 1, k, last)])
    for dd in per_axis[0]:
        for hh in per_axis[1]:
            for ww in per_axis[2]:
                yield dd, hh, ww


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``window_size > 0``: attention inside zero-padded cubic windows; 0: global attention over the grid.
    Shapes: ``(B, g, g, g, E) -> (B, g, g, g, E)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Type[nn.Module] = nn.GELU,
                 use_rel_pos: bool = False, rel_pos_zero_init: bool = True, window_size: int = 0,
                 input_size: Optional[Size3] = None) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              rel_pos_zero_init=rel_pos_zero_init,
                              input_size=input_size if window_size == 0 else (window_size,) * 3)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward_grid(self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """SAM-Med3D ViT image encoder (official ``ImageEncoderViT3D``; defaults are the official ones).

    Args:
        img_size: S, the only accepted input size (pos_embed is not interpolated).
        patch_size: p; embed_dim: E; depth: number of blocks; num_heads: h; mlp_ratio: MLP width / E.
        out_chans: channels of the neck output (= prompt / transformer dim).
        norm_layer: class or partial for the block norms (vit_b_ori: LayerNorm eps 1e-6).
        window_size: window of the non-global blocks (0 = all global); global_attn_indexes: global blocks.
        rel_pos_zero_init: accepted for compatibility; tables are always zero-initialised (as official).

    Shapes: ``(B, in_chans, S, S, S) -> (B, out_chans, g, g, g)``.
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 qkv_bias: bool = True, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 act_layer: Type[nn.Module] = nn.GELU, use_abs_pos: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, window_size: int = 0,
                 global_attn_indexes: Sequence[int] = ()) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.in_chans = in_chans
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(kernel_size=(patch_size,) * 3, stride=(patch_size,) * 3,
                                        in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  norm_layer=norm_layer, act_layer=act_layer, use_rel_pos=use_rel_pos,
                  rel_pos_zero_init=rel_pos_zero_init,
                  window_size=window_size if i not in global_attn_indexes else 0,
                  input_size=(grid,) * 3)
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans,) + (self.img_size,) * 3
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"image encoder expects input (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
