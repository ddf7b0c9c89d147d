"""Generalist branch: SAM-Med3D pseudo-labels for unlabeled patches, prompted only by the student.

``GeneralistBranch(models, prompt=...).pseudo_labels(images, student_fg_prob) -> PseudoLabels(pseudo_label,
confidence, variant_logits, stats)``; ``branch(images, student_fg_prob) -> (pseudo_label, confidence)``.
It never sees a label: every prompt is derived from ``student_fg_prob``, the student V-Net's (the
specialist's) detached foreground probability (channel 1 of its softmax).

Pipeline for a batch of B patches (B, 1, X, Y, Z):

1. SAM input normalisation, per sample: z-score with mean / std (unbiased, as torch / torchio) over the
   patch voxels > 0, applied to the whole patch. This is torchio's ``ZNormalization(masking_method=
   lambda x: x > 0)`` used by SAM-Med3D and SemiSAM, done in torch. If fewer than 2 voxels are > 0 or
   their std is 0, the statistics of the whole patch are used (std 0 -> 1) instead of failing.
2. Geometry: SAM needs an S^3 cube (S = ``model.img_size``).
   * ``'pad'``: the patch is centred in the cube (``before = (S - n) // 2`` per axis). The image
     padding value is the sample's minimum after normalisation, i.e. the darkest value, which is what
     SAM-Med3D saw around its (zero-padded, non-negative-intensity) training crops; the padding is
     excluded from the statistics. The student's probability is padded with 0. SAM's logits are
     upsampled to S^3 and the patch region is cropped back exactly.
   * ``'resample'``: image and probability are resized trilinearly (align_corners=False) to S^3; SAM's
     low-res logits are resized straight to the patch size (the same field of view) before the threshold.
3. Prompts (SAM's predictor split: ``encode`` runs the image encoder once per model per call for the
   whole batch, ``decode`` runs the prompt encoder and mask decoder once per prompt; every decoder call
   is batched, ``multimask_output=False`` everywhere, all state is per sample):
   * ``'point'``: ``num_clicks`` iterative clicks (utils/clicks.py) against the target
     ``student_fg_prob > 0.5`` in SAM coordinates; the clicks so far are all passed at every step,
     and the previous low-res logits are the mask prompt (zeros of size (4g)^3 at the first click, as
     SemiSAM's interpolated zero mask). SAM's current mask for the next click is ``logits > 0``
     restricted to the patch region (with 'pad', SAM's output in the padding is no error, so
     corrective clicks stay inside the patch; the masks are therefore only computed there, SAM's
     logits upsampled inside the patch box only). Click 1 is made against an empty mask, so it
     depends only on the student and is computed once per call and shared by all models.
   * ``'mask'``: the student's probability resized trilinearly to (4g)^3 is the only prompt
     (points=None). SemiSAM+ feeds this probability map, so we do too, although SAM's iterative use
     feeds logits through the same input.
   * ``'unc'``: prompt variants = the masks after clicks 1, 3, 5, ... and ``num_clicks`` of the point
     run (``unc_clicks``) plus the mask-prompt run, for every model.
4. Combination. One variant (one model, 'point' or 'mask'): pseudo_label = upsampled logits > 0
   (official defect 3 thresholded logits at 0.5), confidence = 1. Several variants (several models, or
   'unc'): with p_v = sigmoid(upsampled logits of variant v), pseudo_label = mean_v p_v > 0.5 and, per
   voxel, ``confidence = clip(1 - 4 * Var_v(p_v), 0, 1)`` with the population variance. A variable in
   [0, 1] has variance at most 1/4 (attained by equal mass at 0 and 1), so 1 means the variants agree and
   0 means maximal disagreement. It is a voxel map per sample (official defect 6: a scalar of the last
   sample).

Everything runs under ``torch.inference_mode()``; the returned tensors are ordinary (cloned) tensors,
usable as loss targets. ``amp_dtype`` autocasts the image encoder and mask decoder; the prompt encoder
stays float32 because its sinusoidal coordinate encoding needs the precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.clicks import accumulate_clicks, next_clicks
from utils.runtime import autocast

__all__ = ["GeneralistBranch", "ImageEmbedding", "PseudoLabels", "GeneralistStats", "pseudo_label", "sam_znorm",
           "PROMPTS", "GEOMETRIES", "TIMER_SECTIONS"]

PROMPTS = ("point", "mask", "unc")
GEOMETRIES = ("pad", "resample")
# what a branch's ``timer`` is called with: the image encoder, prompt encoder and mask decoder calls; click 1
# (connected components and an exact distance transform, on the host CPU) and the later, random clicks
TIMER_SECTIONS = ("generalist.encoder", "generalist.prompt_encoder", "generalist.decoder",
                  "generalist.first_click", "generalist.clicks")


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
    (the student's target is empty and SAM's output is no error in the padding, so no click can land
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

    def region_target(self, student_fg_prob: torch.Tensor) -> torch.Tensor:
        """student_fg_prob (B, X, Y, Z) -> its foreground (B, *region shape) bool in SAM space."""
        if self.mode == "pad":
            return student_fg_prob.float() > 0.5
        return self.to_sam(student_fg_prob.float().unsqueeze(1), 0.0)[:, 0] > 0.5

    def region_logits(self, low: torch.Tensor) -> torch.Tensor:
        """low-res logits (B, 1, L, L, L) -> SAM's full-size logits inside the region (B, *region shape)."""
        return _upsample_box(low, self.size, self.region)

    def logits_to_patch(self, low: torch.Tensor, region_logits: torch.Tensor | None = None) -> torch.Tensor:
        """low-res logits (B, 1, L, L, L) -> (B, X, Y, Z); 'pad' reuses ``region_logits`` when given."""
        if self.mode == "resample":
            return F.interpolate(low, size=self.patch_shape, mode="trilinear", align_corners=False)[:, 0]
        return region_logits if region_logits is not None else self.region_logits(low)


def _combine(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variants' patch logits, each (B, X, Y, Z) -> pseudo_label, confidence float32 (B, X, Y, Z)."""
    if len(logits) == 1:
        return (logits[0] > 0).float(), torch.ones_like(logits[0])
    probs = torch.sigmoid(torch.stack(logits))
    pseudo_label = (probs.mean(dim=0) > 0.5).float()
    confidence = (1.0 - 4.0 * probs.var(dim=0, unbiased=False)).clamp(0.0, 1.0)
    return pseudo_label, confidence


@dataclass
class ImageEmbedding:
    """One generalist's encoding of a batch of B patches: what each of its prompts is decoded against.

    embeddings: (B, E, g, g, g) float32 image embeddings; positional: SAM's dense positional encoding
    (1, E, g, g, g); geometry: the patch <-> SAM-cube mapping of this model's input size.
    """
    model: nn.Module
    geometry: _Geometry
    embeddings: torch.Tensor
    positional: torch.Tensor

    @property
    def low_size(self) -> int:
        """Edge L of the decoder's low-res logits (B, 1, L, L, L): 4 g."""
        return 4 * self.embeddings.shape[-1]


@dataclass
class GeneralistStats:
    """Diagnostics of one branch call, as tensors on the images' device (read them with ``.item()``; the
    training engine reads them with the step's other scalars in one host sync).

    clicks_positive, clicks_negative: 0-d int64, over all samples and models; variants: prompt variants
    combined; foreground_fraction: 0-d float32, fraction of pseudo-label voxels; mean_confidence: 0-d
    float32; dice_vs_student: 0-d float32 Dice of the pseudo-label with ``student_fg_prob > 0.5`` (1 when
    both are empty).
    """
    clicks_positive: torch.Tensor
    clicks_negative: torch.Tensor
    variants: int
    foreground_fraction: torch.Tensor
    mean_confidence: torch.Tensor
    dice_vs_student: torch.Tensor


@dataclass
class PseudoLabels:
    """What ``GeneralistBranch.pseudo_labels`` returns for B patches (X, Y, Z).

    pseudo_label: float32 (B, X, Y, Z) in {0, 1}; confidence: float32 (B, X, Y, Z) in [0, 1] (both
    ordinary tensors, usable as loss targets); variant_logits: SAM's logits of each prompt variant in patch
    coordinates, (B, X, Y, Z) each, inference tensors (clone one to use it in autograd); stats.
    """
    pseudo_label: torch.Tensor
    confidence: torch.Tensor
    variant_logits: tuple[torch.Tensor, ...]
    stats: GeneralistStats


def _null_timer(name: str) -> ContextManager:
    return contextlib.nullcontext()


class GeneralistBranch:
    """Frozen SAM-Med3D generalist(s) producing pseudo-labels prompted by the student's foreground probability.

    SAM's predictor split: ``encode(images)`` runs each image encoder once per call, ``decode(embedding,
    points, mask_prompt)`` runs the prompt encoder and mask decoder for one (batched) prompt; the clicks
    of a point run each decode against the same embedding. ``pseudo_labels(images, student_fg_prob)`` runs
    the whole pipeline (module docstring); ``branch(images, student_fg_prob)`` returns just its
    ``(pseudo_label, confidence)``.

    Args:
        models: one Sam3D or a list of them (e.g. SAM-Med3D and SAM-Med3D-turbo), built once, on the
            images' device. They are put in eval mode with requires_grad False.
        prompt: 'point' | 'mask' | 'unc' (see the module docstring).
        num_clicks: clicks of the point run ('point' and 'unc').
        geometry: 'pad' (patch must fit in img_size^3) | 'resample'.
        amp_dtype: None or a dtype (torch.bfloat16) to autocast the encoder and decoder.
        generator: torch.Generator of the random clicks; default ``torch.Generator().manual_seed(0)``.
            The training engine saves / restores its state for exact resume.
        edt_clicks: the first ``edt_clicks`` clicks use the deepest point of the largest error region.
        unc_clicks: clicks after which the point run's mask is a variant for 'unc';
            default 1, 3, 5, ... and num_clicks.
        timer: ``timer(name)`` -> context manager around each part of the work (``TIMER_SECTIONS``), e.g.
            the training engine's ``training.timing.SectionTimer``; default: measures nothing.
    """

    def __init__(self, models, prompt: str = "point", num_clicks: int = 10, geometry: str = "pad",
                 amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                 edt_clicks: int = 1, unc_clicks: Sequence[int] | None = None,
                 timer: Callable[[str], ContextManager] | None = None):
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
        self.timer = timer or _null_timer

    # -- SAM's predictor split ------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        return autocast(device, self.amp_dtype)

    def encode(self, images: torch.Tensor) -> list[ImageEmbedding]:
        """images (B, 1, X, Y, Z) -> one ``ImageEmbedding`` per model (SAM normalisation, geometry, image
        encoder). Call under ``torch.inference_mode()``, as ``pseudo_labels`` does."""
        normed = sam_znorm(images)
        pad_value = normed.flatten(1).amin(dim=1)
        encoded = []
        for model in self.models:
            geom = _Geometry(images.shape[2:], int(model.img_size), self.geometry)
            sam_image = geom.to_sam(normed, pad_value)
            with self._autocast(images.device), self.timer("generalist.encoder"):
                emb = model.image_encoder(sam_image)
            encoded.append(ImageEmbedding(model, geom, emb.float(), model.prompt_encoder.get_dense_pe()))
        return encoded

    def decode(self, embedding: ImageEmbedding, points: tuple[torch.Tensor, torch.Tensor] | None,
               mask_prompt: torch.Tensor | None) -> torch.Tensor:
        """One batched prompt-encoder + mask-decoder call -> low-res logits float32 (B, 1, L, L, L).

        points: None or (coords (B, N, 3) in SAM's cube, labels (B, N) 1 positive / 0 negative);
        mask_prompt: None or (B, 1, L, L, L). Call under ``torch.inference_mode()``."""
        model, emb = embedding.model, embedding.embeddings
        # the prompt encoder stays float32: its sinusoidal coordinate encoding needs the precision
        with self.timer("generalist.prompt_encoder"):
            sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask_prompt)
        with self._autocast(emb.device), self.timer("generalist.decoder"):
            low, _ = model.mask_decoder(image_embeddings=emb, image_pe=embedding.positional,
                                        sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
        return low.float()

    def _point_run(self, embedding: ImageEmbedding, target, first_click, record: Sequence[int],
                   counts: torch.Tensor) -> list[torch.Tensor]:
        """Iterative clicks; returns the patch logits (B, X, Y, Z) after each click in ``record``.
        ``target``: (B, *region shape) bool; ``first_click``: (coords (B, 1, 3) in the region, labels
        (B, 1)) of click 1, made against an empty mask."""
        geom, emb = embedding.geometry, embedding.embeddings
        offset = torch.tensor(geom.offset, dtype=torch.long, device=emb.device)
        low = torch.zeros((emb.shape[0], 1) + (embedding.low_size,) * 3, device=emb.device)
        pred = torch.zeros_like(target)
        history = None
        recorded = []
        for k in range(self.num_clicks):
            if k == 0:
                coords, labels = first_click
            else:
                with self.timer("generalist.clicks"):
                    coords, labels = next_clicks(pred, target, k, self.generator, self.edt_clicks)
            counts[0] += labels.sum()
            counts[1] += (1 - labels).sum()
            history = accumulate_clicks(history, coords + offset, labels)
            low = self.decode(embedding, history, low)
            logits = geom.region_logits(low)
            pred = logits > 0
            if k + 1 in record:
                recorded.append(geom.logits_to_patch(low, logits))
        return recorded

    # -- public ---------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, student_fg_prob: torch.Tensor) -> None:
        if images.dim() != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, X, Y, Z); got {tuple(images.shape)}")
        if student_fg_prob.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"student_fg_prob must be the foreground probability (B, X, Y, Z) = "
                             f"{tuple(images.shape[:1] + images.shape[2:])}; got {tuple(student_fg_prob.shape)}")
        if student_fg_prob.device != images.device:
            raise ValueError(f"student_fg_prob on {student_fg_prob.device} but images on {images.device}")
        for i, m in enumerate(self.models):
            p = next(m.parameters(), None)
            if p is not None and p.device != images.device:
                raise ValueError(f"generalist model {i} is on {p.device} but images are on {images.device}")
        lo, hi = torch.aminmax(student_fg_prob.detach().float())
        if bool(lo < 0) or bool(hi > 1) or not bool(torch.isfinite(student_fg_prob).all()):
            raise ValueError(f"student_fg_prob must be a probability in [0, 1]; got range "
                             f"[{lo.item():.4g}, {hi.item():.4g}] (pass softmax(logits)[:, 1], not logits)")

    def pseudo_labels(self, images: torch.Tensor, student_fg_prob: torch.Tensor,
                      embeddings: Sequence[ImageEmbedding] | None = None) -> PseudoLabels:
        """images (B, 1, X, Y, Z), student_fg_prob (B, X, Y, Z) in [0, 1] -> ``PseudoLabels``.

        ``student_fg_prob`` is the only source of prompts (never a label); it is detached here. ``embeddings``:
        ``encode(images)`` made earlier (e.g. once for the prompts of several classes); None encodes here."""
        self._check_inputs(images, student_fg_prob)
        with torch.inference_mode():
            out = self._run(images.detach(), student_fg_prob.detach(), embeddings)
        # clones made outside inference mode are normal tensors that autograd may save as targets
        out.pseudo_label, out.confidence = out.pseudo_label.clone(), out.confidence.clone()
        return out

    def __call__(self, images: torch.Tensor, student_fg_prob: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 1, X, Y, Z), student_fg_prob (B, X, Y, Z) in [0, 1]
        -> pseudo_label float32 (B, X, Y, Z) in {0, 1}, confidence float32 (B, X, Y, Z) in [0, 1]."""
        out = self.pseudo_labels(images, student_fg_prob)
        return out.pseudo_label, out.confidence

    def _run(self, images: torch.Tensor, student_fg_prob: torch.Tensor,
             embeddings: Sequence[ImageEmbedding] | None = None) -> PseudoLabels:
        counts = torch.zeros(2, dtype=torch.long, device=images.device)
        variants: list[torch.Tensor] = []
        record = self.unc_clicks if self.prompt == "unc" else (self.num_clicks,)
        # SAM's mask is empty before click 1, so that click depends only on the student: make it
        # once per call (and SAM input size) for all models; its EDT is the costly CPU step
        first_clicks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for embedding in self.encode(images) if embeddings is None else embeddings:
            geom = embedding.geometry
            if self.prompt in ("point", "unc"):
                target = geom.region_target(student_fg_prob)
                if geom.size not in first_clicks:  # same size, same region
                    with self.timer("generalist.first_click"):
                        first_clicks[geom.size] = next_clicks(torch.zeros_like(target), target, 0,
                                                              self.generator, self.edt_clicks)
                variants += self._point_run(embedding, target, first_clicks[geom.size], record, counts)
            if self.prompt in ("mask", "unc"):
                sam_prob = geom.to_sam(student_fg_prob.float().unsqueeze(1), 0.0)
                mask_prompt = F.interpolate(sam_prob, size=(embedding.low_size,) * 3, mode="trilinear",
                                            align_corners=False)
                variants.append(geom.logits_to_patch(self.decode(embedding, None, mask_prompt)))
        pseudo_label, confidence = _combine(variants)
        student = (student_fg_prob > 0.5).float()
        inter = (pseudo_label * student).sum()
        denom = pseudo_label.sum() + student.sum()
        stats = GeneralistStats(
            clicks_positive=counts[0], clicks_negative=counts[1], variants=len(variants),
            foreground_fraction=pseudo_label.mean(), mean_confidence=confidence.mean(),
            dice_vs_student=torch.where(denom > 0, 2 * inter / denom, torch.ones_like(denom)))
        return PseudoLabels(pseudo_label, confidence, tuple(variants), stats)


def combine_classes(per_class: Sequence[PseudoLabels]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pseudo-label from the generalist's binary answers for the foreground classes 1..K-1 (SAM-Med3D is
    binary: it is prompted once per class).

    per_class[k - 1]: the answer for class k (pseudo_label and confidence (B, X, Y, Z)). Returns label int64
    (B, X, Y, Z) in 0..K-1 and confidence float32 (B, X, Y, Z): a voxel in one class's mask takes that class;
    in several, the class whose answer is most confident there (the lower class on ties); in none, background
    with the least confident class's confidence (every class's answer said "not mine"). The voxel's confidence
    is that of the answer it took."""
    masks = torch.stack([p.pseudo_label > 0.5 for p in per_class])            # (K-1, B, X, Y, Z)
    conf = torch.stack([p.confidence for p in per_class])
    score = torch.where(masks, conf, torch.full_like(conf, -1.0))
    winner = score.argmax(dim=0)                                               # the first maximum on ties
    best = score.gather(0, winner.unsqueeze(0)).squeeze(0)
    covered = masks.any(dim=0)
    label = torch.where(covered, winner + 1, torch.zeros_like(winner))
    confidence = torch.where(covered, best, conf.min(dim=0).values)
    return label, confidence


def pseudo_label(models, images: torch.Tensor, student_fg_prob: torch.Tensor, prompt: str = "point",
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of ``GeneralistBranch(models, prompt=prompt, **kw)(images, student_fg_prob)``.
    A fresh branch (and default generator seeded 0) per call: use the class in training loops."""
    return GeneralistBranch(models, prompt=prompt, **kw)(images, student_fg_prob)
