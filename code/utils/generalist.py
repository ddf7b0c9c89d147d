"""Generalist branch: SAM-Med3D pseudo-labels for unlabeled patches, prompted only by the specialist.

``GeneralistBranch(models, prompt=...)(images, specialist_prob) -> (mask, weight)``. It never sees a
label: every prompt is derived from ``specialist_prob``, the specialist's (V-Net's) foreground
probability (channel 1 of its softmax).

Pipeline for a batch of B patches (B, 1, X, Y, Z):

1. SAM input normalisation, per sample: z-score with mean / std (unbiased, as torch / torchio) over the
   patch voxels > 0, applied to the whole patch. This is torchio's ``ZNormalization(masking_method=
   lambda x: x > 0)`` used by SAM-Med3D and SemiSAM, done in torch. If fewer than 2 voxels are > 0 or
   their std is 0, the statistics of the whole patch are used (std 0 -> 1) instead of failing.
2. Geometry: SAM needs an S^3 cube (S = ``model.img_size``).
   * ``'pad'``: the patch is centred in the cube (``before = (S - n) // 2`` per axis). The image
     padding value is the sample's minimum after normalisation, i.e. the darkest value, which is what
     SAM-Med3D saw around its (zero-padded, non-negative-intensity) training crops; the padding is
     excluded from the statistics. The specialist probability is padded with 0. SAM's logits are
     upsampled to S^3 and the patch region is cropped back exactly.
   * ``'resample'``: image and probability are resized trilinearly (align_corners=False) to S^3; SAM's
     low-res logits are resized straight to the patch size (the same field of view) before the threshold.
3. Prompts (``multimask_output=False`` everywhere; the image encoder runs once per model per call for
   the whole batch, every decoder call is batched, all state is per sample):
   * ``'point'``: ``num_clicks`` iterative clicks (utils/clicks.py) against the target
     ``specialist_prob > 0.5`` in SAM coordinates; the clicks so far are all passed at every step,
     and the previous low-res logits are the mask prompt (zeros of size (4g)^3 at the first click, as
     SemiSAM's interpolated zero mask). SAM's current mask for the next click is ``logits > 0``
     restricted to the patch region (with 'pad', SAM's output in the padding is no error, so
     corrective clicks stay inside the patch; the masks are therefore only computed there, SAM's
     logits upsampled inside the patch box only). Click 1 is made against an empty mask, so it
     depends only on the specialist and is computed once per call and shared by all models.
   * ``'mask'``: the specialist probability resized trilinearly to (4g)^3 is the only prompt
     (points=None). SemiSAM+ feeds this probability map, so we do too, although SAM's iterative use
     feeds logits through the same input.
   * ``'unc'``: prompt variants = the masks after clicks 1, 3, 5, ... and ``num_clicks`` of the point
     run (``unc_clicks``) plus the mask-prompt run, for every model.
4. Combination. One variant (one model, 'point' or 'mask'): mask = upsampled logits > 0 (official
   defect 3 thresholded logits at 0.5), weight = 1. Several variants (several models, or 'unc'): with
   p_v = sigmoid(upsampled logits of variant v), mask = mean_v p_v > 0.5 and, per voxel,
   ``weight = clip(1 - 4 * Var_v(p_v), 0, 1)`` with the population variance. A variable in [0, 1] has
   variance at most 1/4 (attained by equal mass at 0 and 1), so weight 1 means the variants agree and
   0 means maximal disagreement. It is a voxel map per sample (official defect 6: a scalar of the last
   sample).

Everything runs under ``torch.inference_mode()``; the returned tensors are ordinary (cloned) tensors,
usable as loss targets. ``amp_dtype`` autocasts the image encoder and mask decoder; the prompt encoder
stays float32 because its sinusoidal coordinate encoding needs the precision.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.clicks import accumulate_clicks, next_clicks
from utils.runtime import autocast

__all__ = ["GeneralistBranch", "pseudo_label", "sam_znorm", "PROMPTS", "GEOMETRIES"]

PROMPTS = ("point", "mask", "unc")
GEOMETRIES = ("pad", "resample")


def sam_znorm(images: torch.Tensor) -> torch.Tensor:
    """Per-sample z-normalisation with statistics over voxels > 0 (torchio's ZNormalization as used by
    SAM-Med3D). images: (B, 1, X, Y, Z) -> float32 (B, 1, X, Y, Z)."""
    x = images.float()
    flat = x.flatten(1).double()
    positive = flat > 0
    n = positive.sum(dim=1)
    mean = torch.where(positive, flat, 0).sum(dim=1) / n.clamp(min=1)
    var = torch.where(positive, (flat - mean[:, None]) ** 2, 0).sum(dim=1) / (n - 1).clamp(min=1)
    std = var.sqrt()
    usable = (n >= 2) & (std > 0)
    mean = torch.where(usable, mean, flat.mean(dim=1))
    std = torch.where(usable, std, flat.std(dim=1))
    std = torch.where(std > 0, std, torch.ones_like(std))
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.float().view(shape)) / std.float().view(shape)


def _upsample_box(low: torch.Tensor, size: int, box: tuple[slice, slice, slice]) -> torch.Tensor:
    """Trilinear (align_corners=False) upsampling of low (B, 1, L, L, L) to size^3, evaluated only
    inside ``box`` -> (B, *box shape).

    Bitwise equal to upsampling the whole cube and cropping when size / L is a power of two: the
    sub-volume low[lo:hi] (one low-res voxel of margin around the box, so no output inside the box
    is clamped at the sub-volume's border) upsampled by the same factor uses the same source
    coordinates and weights, all exact in binary floating point. Otherwise the whole cube is computed.
    """
    n = low.shape[-1]
    ratio = size // n
    if size % n or ratio & (ratio - 1):
        return F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)[(slice(None), 0) + box]
    lo = [max(0, b.start // ratio - 1) for b in box]
    hi = [min(n, -(-b.stop // ratio) + 1) for b in box]
    sub = low[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))]
    up = F.interpolate(sub, size=tuple((b - a) * ratio for a, b in zip(lo, hi)), mode="trilinear",
                       align_corners=False)[:, 0]
    return up[(slice(None),) + tuple(slice(b.start - a * ratio, b.stop - a * ratio) for b, a in zip(box, lo))]


class _Geometry:
    """Maps a patch (X, Y, Z) into SAM's S^3 input and SAM's logits back to the patch.

    ``region``: the part of SAM's cube where clicks are decided, as slices: the patch crop for 'pad'
    (the specialist target is empty and SAM's output is no error in the padding, so no click can land
    outside it), the whole cube for 'resample'. Masks for the clicks are computed on the region only.
    """

    def __init__(self, patch_shape: Sequence[int], img_size: int, mode: str):
        self.patch_shape = tuple(int(n) for n in patch_shape)
        self.size = int(img_size)
        self.mode = mode
        if mode == "pad":
            if any(n > self.size for n in self.patch_shape):
                raise ValueError(f"geometry='pad': patch {self.patch_shape} does not fit SAM's "
                                 f"{self.size}^3 input; use geometry='resample' or a smaller patch")
            before = [(self.size - n) // 2 for n in self.patch_shape]
            self.region = tuple(slice(b, b + n) for b, n in zip(before, self.patch_shape))
        else:
            self.region = (slice(0, self.size),) * 3
        self.offset = tuple(sl.start for sl in self.region)

    def to_sam(self, vol: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
        """vol (B, C, X, Y, Z) -> (B, C, S, S, S); fill: padding value, scalar or per sample (B,)."""
        cube = (self.size,) * 3
        if self.mode == "resample":
            return F.interpolate(vol, size=cube, mode="trilinear", align_corners=False)
        fill = torch.as_tensor(fill, dtype=vol.dtype, device=vol.device).reshape(-1, 1, 1, 1, 1)
        out = fill.expand(vol.shape[0], vol.shape[1], *cube).clone()
        out[(slice(None), slice(None)) + self.region] = vol
        return out

    def region_target(self, prob: torch.Tensor) -> torch.Tensor:
        """specialist probability (B, X, Y, Z) -> its foreground (B, *region shape) bool in SAM space."""
        if self.mode == "pad":
            return prob.float() > 0.5
        return self.to_sam(prob.float().unsqueeze(1), 0.0)[:, 0] > 0.5

    def region_logits(self, low: torch.Tensor) -> torch.Tensor:
        """low-res logits (B, 1, L, L, L) -> SAM's full-size logits inside the region (B, *region shape)."""
        return _upsample_box(low, self.size, self.region)

    def logits_to_patch(self, low: torch.Tensor, region_logits: torch.Tensor | None = None) -> torch.Tensor:
        """low-res logits (B, 1, L, L, L) -> (B, X, Y, Z); 'pad' reuses ``region_logits`` when given."""
        if self.mode == "resample":
            return F.interpolate(low, size=self.patch_shape, mode="trilinear", align_corners=False)[:, 0]
        return region_logits if region_logits is not None else self.region_logits(low)


def _combine(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variants' patch logits, each (B, X, Y, Z) -> mask, weight float32 (B, X, Y, Z)."""
    if len(logits) == 1:
        return (logits[0] > 0).float(), torch.ones_like(logits[0])
    probs = torch.sigmoid(torch.stack(logits))
    mask = (probs.mean(dim=0) > 0.5).float()
    weight = (1.0 - 4.0 * probs.var(dim=0, unbiased=False)).clamp(0.0, 1.0)
    return mask, weight


class GeneralistBranch:
    """Frozen SAM-Med3D generalist(s) producing pseudo-labels from specialist prompts.

    Args:
        models: one Sam3D or a list of them (e.g. SAM-Med3D and SAM-Med3D-turbo), built once, on the
            images' device. They are put in eval mode with requires_grad False.
        prompt: 'point' | 'mask' | 'unc' (see the module docstring).
        num_clicks: clicks of the point run ('point' and 'unc').
        geometry: 'pad' (patch must fit in img_size^3) | 'resample'.
        amp_dtype: None or a dtype (torch.bfloat16) to autocast the encoder and decoder.
        generator: torch.Generator of the random clicks; default ``torch.Generator().manual_seed(0)``.
            The training engine saves / restores ``branch.generator.get_state()`` for exact resume.
        edt_clicks: the first ``edt_clicks`` clicks use the deepest point of the largest error region.
        unc_clicks: clicks after which the point run's mask is a variant for 'unc';
            default 1, 3, 5, ... and num_clicks.

    Attributes:
        last_stats: dict of the last call, for logging: clicks_positive, clicks_negative (over all
            samples and models), variants, foreground_fraction, mean_weight, dice_vs_specialist
            (agreement of the pseudo-label with specialist_prob > 0.5).
    """

    def __init__(self, models, prompt: str = "point", num_clicks: int = 10, geometry: str = "pad",
                 amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                 edt_clicks: int = 1, unc_clicks: Sequence[int] | None = None):
        if isinstance(models, nn.Module):
            models = [models]
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("GeneralistBranch needs a non-empty list of Sam3D models")
        if prompt not in PROMPTS:
            raise ValueError(f"unknown prompt {prompt!r}; expected one of {PROMPTS}")
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")
        if int(num_clicks) < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype}")
        self.num_clicks = int(num_clicks)
        if unc_clicks is None:
            unc_clicks = sorted(set(range(1, self.num_clicks + 1, 2)) | {self.num_clicks})
        unc_clicks = sorted({int(k) for k in unc_clicks})
        if not unc_clicks or unc_clicks[0] < 1 or unc_clicks[-1] > self.num_clicks:
            raise ValueError(f"unc_clicks must lie in 1..num_clicks={self.num_clicks}, got {unc_clicks}")
        for m in models:
            m.eval()
            m.requires_grad_(False)
        self.models = models
        self.prompt = prompt
        self.geometry = geometry
        self.amp_dtype = amp_dtype
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.edt_clicks = int(edt_clicks)
        self.unc_clicks = tuple(unc_clicks)
        self.last_stats: dict = {}

    # -- SAM calls --------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        return autocast(device, self.amp_dtype)

    def _decode(self, model, emb, pe, points, mask_prompt) -> torch.Tensor:
        """One batched prompt-encoder + mask-decoder call -> low-res logits float32 (B, 1, L, L, L)."""
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask_prompt)
        with self._autocast(emb.device):
            low, _ = model.mask_decoder(image_embeddings=emb, image_pe=pe,
                                        sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
        return low.float()

    def _point_run(self, model, emb, pe, target, first_click, geom: _Geometry, low_size: int,
                   record: Sequence[int], counts: torch.Tensor) -> list[torch.Tensor]:
        """Iterative clicks; returns the patch logits (B, X, Y, Z) after each click in ``record``.
        ``target``: (B, *region shape) bool; ``first_click``: (coords (B, 1, 3) in the region, labels
        (B, 1)) of click 1, made against an empty mask."""
        batch = emb.shape[0]
        offset = torch.tensor(geom.offset, dtype=torch.long, device=emb.device)
        low = torch.zeros((batch, 1) + (low_size,) * 3, device=emb.device)
        pred = torch.zeros_like(target)
        history = None
        recorded = []
        for k in range(self.num_clicks):
            coords, labels = first_click if k == 0 else next_clicks(pred, target, k, self.generator,
                                                                     self.edt_clicks)
            counts[0] += labels.sum()
            counts[1] += (1 - labels).sum()
            history = accumulate_clicks(history, coords + offset, labels)
            low = self._decode(model, emb, pe, history, low)
            logits = geom.region_logits(low)
            pred = logits > 0
            if k + 1 in record:
                recorded.append(geom.logits_to_patch(low, logits))
        return recorded

    # -- public ---------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, prob: torch.Tensor) -> None:
        if images.dim() != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, X, Y, Z); got {tuple(images.shape)}")
        if prob.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"specialist_prob must be the foreground probability (B, X, Y, Z) = "
                             f"{tuple(images.shape[:1] + images.shape[2:])}; got {tuple(prob.shape)}")
        if prob.device != images.device:
            raise ValueError(f"specialist_prob on {prob.device} but images on {images.device}")
        for i, m in enumerate(self.models):
            p = next(m.parameters(), None)
            if p is not None and p.device != images.device:
                raise ValueError(f"generalist model {i} is on {p.device} but images are on {images.device}")
        lo, hi = torch.aminmax(prob.detach().float())
        if bool(lo < 0) or bool(hi > 1) or not bool(torch.isfinite(prob).all()):
            raise ValueError(f"specialist_prob must be a probability in [0, 1]; got range "
                             f"[{lo.item():.4g}, {hi.item():.4g}] (pass softmax(logits)[:, 1], not logits)")

    def __call__(self, images: torch.Tensor, specialist_prob: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 1, X, Y, Z), specialist_prob (B, X, Y, Z) in [0, 1]
        -> mask float32 (B, X, Y, Z) in {0, 1}, weight float32 (B, X, Y, Z) in [0, 1]."""
        self._check_inputs(images, specialist_prob)
        with torch.inference_mode():
            mask, weight, stats = self._run(images.detach(), specialist_prob.detach())
        self.last_stats = stats
        # clones made outside inference mode are normal tensors that autograd may save as targets
        return mask.clone(), weight.clone()

    def _run(self, images, prob):
        patch_shape = images.shape[2:]
        normed = sam_znorm(images)
        pad_value = normed.flatten(1).amin(dim=1)
        counts = torch.zeros(2, dtype=torch.long, device=images.device)
        variants: list[torch.Tensor] = []
        record = self.unc_clicks if self.prompt == "unc" else (self.num_clicks,)
        # SAM's mask is empty before click 1, so that click depends only on the specialist: make it
        # once per call (and SAM input size) for all models; its EDT is the costly CPU step
        first_clicks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for model in self.models:
            geom = _Geometry(patch_shape, int(model.img_size), self.geometry)
            sam_image = geom.to_sam(normed, pad_value)
            with self._autocast(images.device):
                emb = model.image_encoder(sam_image)
            emb = emb.float()
            pe = model.prompt_encoder.get_dense_pe()
            low_size = 4 * emb.shape[-1]
            if self.prompt in ("point", "unc"):
                target = geom.region_target(prob)
                if geom.size not in first_clicks:  # same size, same region
                    first_clicks[geom.size] = next_clicks(torch.zeros_like(target), target, 0,
                                                          self.generator, self.edt_clicks)
                variants += self._point_run(model, emb, pe, target, first_clicks[geom.size], geom,
                                            low_size, record, counts)
            if self.prompt in ("mask", "unc"):
                sam_prob = geom.to_sam(prob.float().unsqueeze(1), 0.0)
                mask_prompt = F.interpolate(sam_prob, size=(low_size,) * 3, mode="trilinear",
                                            align_corners=False)
                variants.append(geom.logits_to_patch(self._decode(model, emb, pe, None, mask_prompt)))
        mask, weight = _combine(variants)
        spec = (prob > 0.5).float()
        inter = (mask * spec).sum()
        denom = mask.sum() + spec.sum()
        stats = {
            "clicks_positive": int(counts[0]),
            "clicks_negative": int(counts[1]),
            "variants": len(variants),
            "foreground_fraction": float(mask.mean()),
            "mean_weight": float(weight.mean()),
            "dice_vs_specialist": float(2 * inter / denom) if float(denom) > 0 else 1.0,
        }
        return mask, weight, stats


def pseudo_label(models, images: torch.Tensor, specialist_prob: torch.Tensor, prompt: str = "point",
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of ``GeneralistBranch(models, prompt=prompt, **kw)(images, specialist_prob)``.
    A fresh branch (and default generator seeded 0) per call: use the class in training loops."""
    return GeneralistBranch(models, prompt=prompt, **kw)(images, specialist_prob)
