"""SAM-Med3D-style simulated clicks, batched and on the tensors' device.

A click corrects the current SAM mask ``pred`` towards a ``target`` (in SemiSAM: the *specialist's*
foreground, never a label). Error regions are the false negatives ``target & ~pred`` (SAM misses
target foreground: positive click, label 1) and the false positives ``pred & ~target`` (label 0).

* Clicks ``click_index < edt_clicks``: the deepest voxel (largest Euclidean distance to the region's
  boundary, the volume border counting as boundary as in SAM-Med3D / RITM, which pad before the EDT)
  of the LARGEST 6-connected error region (most voxels; FN and FP regions are labelled separately, a
  size tie prefers the FN region). Ties of the distance maximum take the first voxel in C order, so
  these clicks are deterministic. Done for every sample (the official code ran the EDT for sample 0
  only and reused its click region for the whole batch).
* Later clicks: a uniformly random voxel of the union of error voxels, drawn from ``generator``.
* No error at all (SAM already equals the target): a random voxel of the target with label 1 if the
  target is non-empty (it confirms the foreground), otherwise a random voxel of the volume given with
  label 0 (the generalist branch passes only the patch region, so such a click never lands in padding).

The label is always read at the clicked voxel itself (official defect 2 read it one axis off, so
nearly every click became negative).

Coordinates are int64 voxel indices in tensor-axis order (X, Y, Z) of the SAM input volume, exactly as
``torch.argwhere`` gives them and as SAM-Med3D's prompt encoder expects.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage

try:  # seung-lab's exact Euclidean distance transform, several times faster than scipy's
    # (results/history.md, "Second pass", item 4)
    import edt as _edt
except ImportError:  # scipy gives the same distances (tested), only slower
    _edt = None

__all__ = ["next_clicks", "accumulate_clicks"]


def _check_masks(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 4 or target.dim() != 4:
        raise ValueError(f"next_clicks expects pred and target of shape (B, X, Y, Z); got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"next_clicks: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must have the same shape")
    if pred.device != target.device:
        raise ValueError(f"next_clicks: pred on {pred.device} but target on {target.device}")


def _depth(mask: np.ndarray) -> np.ndarray:
    """Per voxel of ``mask`` (X, Y, Z) a strictly increasing function of its Euclidean distance to the
    nearest False voxel: the squared distance with edt (integers, exact in its float32), the distance with
    scipy. Both order the voxels identically, so the deepest voxel (first in C order on ties) is the same.
    edt runs on as many threads as torch (the same integers with any count; more threads make it faster,
    results/history.md, "Numbers moved out of code comments"; on a GPU machine this CPU step is what the GPU
    waits for)."""
    if _edt is not None:
        return _edt.edtsq(np.ascontiguousarray(mask, dtype=np.uint8), parallel=max(1, torch.get_num_threads()))
    return ndimage.distance_transform_edt(mask)


def _any(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``mask.any(dim)`` for a bool tensor, as a uint8 maximum: PyTorch's CPU bool ``any`` is far slower than
    the maximum (results/history.md, "Numbers moved out of code comments")."""
    return mask.view(torch.uint8).amax(dim=dim).bool()


def _span(projection: np.ndarray) -> slice:
    """The slice from the first to the last True entry of a 1-D bool array (at least one True)."""
    nz = np.flatnonzero(projection)
    return slice(int(nz[0]), int(nz[-1]) + 1)


def _components(err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-connected components of a bool array -> (labels int32 same shape, sizes (n,) of components 1..n).
    A single component (a trained specialist's usual mask) is counted without a pass over the labels."""
    labels, n = ndimage.label(err)
    if n == 1:
        return labels, np.array([np.count_nonzero(err)])
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]


def _deepest_voxel(regions: list) -> tuple[int, ...] | None:
    """The click of ``next_clicks``' EDT rule from labelled error masks.

    regions: [(offset (3 ints), labels, sizes)] for the non-empty ones of a sample's FN and FP masks
    (FN first), each labelled on a box of the volume that starts at ``offset`` and holds all its voxels.
    Returns the volume voxel (x, y, z) of maximal distance to the boundary inside the largest component
    (most voxels; a tie keeps the earlier region, i.e. FN, and the lower label, as np.argmax), or None.
    """
    best = None  # (size, offset, labels, component id)
    for offset, labels, sizes in regions:
        comp = int(np.argmax(sizes))
        # strict '>' keeps the FN region on a size tie (it comes first)
        if best is None or sizes[comp] > best[0]:
            best = (int(sizes[comp]), offset, labels, comp + 1)
    if best is None:
        return None
    _, offset, labels, comp_id = best
    # the bounding box of this one component, from its projections on the three axes: find_objects(labels)
    # would build a slice tuple for each of the (early in training, tens of thousands of) components, and the
    # garbage collector passes that this triggers in a training process made each call slow (results/history.md,
    # "Second pass", item 4)
    component = labels == comp_id
    box = tuple(_span(component.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3))
    region = component[box]
    # zero padding: voxels on the volume border are at distance 1 from the outside (RITM convention); the
    # box holds the whole component, so its distances are those in the whole volume
    dist = _depth(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(o + sl.start + i) for o, sl, i in zip(offset, box, local))


def _deepest_voxel_of_largest_region(fn: np.ndarray, fp: np.ndarray) -> tuple[int, ...] | None:
    """Voxel (x, y, z) of maximal distance to the boundary inside the largest error region, labelling the
    whole volume (the plain computation; ``_deepest_voxels`` gives the same voxels faster).

    fn, fp: bool arrays (X, Y, Z). Returns None when there is no error voxel.
    """
    return _deepest_voxel([((0, 0, 0),) + _components(err) for err in (fn, fp) if err.any()])


def _deepest_voxels(fn: torch.Tensor, fp: torch.Tensor) -> list:
    """``_deepest_voxel_of_largest_region`` for each sample of fn, fp (B, X, Y, Z) bool (any device).

    The same voxels, cheaper: each mask is labelled on its bounding box only (found on the tensors' device,
    so only the box travels to the host; every component lies inside it, and the labelling scans it in the
    same relative C order, so the components and their numbering are the same), and the labellings of the
    batch run in threads (scipy's labelling releases the GIL; the distance transform does not and has its
    own threads)."""
    crops = []  # (sample, offset, host crop), FN ones first
    for err in (fn, fp):
        yz = _any(err, 1)  # (B, Y, Z)
        spans = [t.cpu().numpy() for t in (_any(err.flatten(2), 2), _any(yz, 2), _any(yz, 1))]
        for b in range(err.shape[0]):
            if not spans[0][b].any():
                continue
            box = tuple(_span(s[b]) for s in spans)
            crops.append((b, tuple(sl.start for sl in box), err[(b,) + box].contiguous().cpu().numpy()))
    workers = min(len(crops), max(1, torch.get_num_threads()))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            labelled = list(pool.map(lambda c: _components(c[2]), crops))
    else:
        labelled = [_components(c[2]) for c in crops]
    regions: list[list] = [[] for _ in range(fn.shape[0])]
    for (b, offset, _), lab in zip(crops, labelled):
        regions[b].append((offset,) + lab)
    return [_deepest_voxel(r) for r in regions]


_BLOCK = 4096  # voxels per block of the two-level search in _kth_true


def _block_counts(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pool (B, N) bool -> (pool as (B, blocks, _BLOCK), zero-padded; cumulative True count per block
    (B, blocks)): one pass over the voxels, shared by the count and the search of a random click."""
    batch, n = pool.shape
    blocks = -(-n // _BLOCK)
    if blocks * _BLOCK != n:
        pool = torch.cat([pool, pool.new_zeros(batch, blocks * _BLOCK - n)], dim=1)
    pool = pool.view(batch, blocks, _BLOCK)
    # summed as uint8 into int32 (at most _BLOCK per block): a bool sum converts every voxel to int64 first,
    # many times slower (results/history.md, "Numbers moved out of code comments")
    return pool, pool.view(torch.uint8).sum(dim=2, dtype=torch.int32).cumsum(dim=1, dtype=torch.int64)


def _kth_true(pool: torch.Tensor, k: torch.Tensor, counts=None) -> torch.Tensor:
    """Flat index of the k-th (0-based, C order) True voxel of each row of ``pool`` (B, N); k (B,) int64,
    k < the row's count. Two levels (counts per block of ``_BLOCK`` voxels, then one block) instead of a
    cumulative sum over all N voxels: that int64 cumsum was the costliest part of a click. ``counts``:
    ``_block_counts(pool)`` when already computed."""
    blocked, cumulative = counts if counts is not None else _block_counts(pool)
    block = torch.searchsorted(cumulative, (k + 1).unsqueeze(1)).squeeze(1)
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    rows = blocked[torch.arange(blocked.shape[0], device=blocked.device), block]  # (B, _BLOCK)
    inner = torch.searchsorted(rows.cumsum(dim=1), (k - before + 1).unsqueeze(1)).squeeze(1)
    return block * _BLOCK + inner


def _random_voxel(pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random flat index of a True voxel of each row of ``pool`` (B, N); every row non-empty."""
    blocks = _block_counts(pool)
    counts = blocks[1][:, -1]
    u = torch.rand(pool.shape[0], generator=generator, dtype=torch.float64,
                   device=generator.device).to(pool.device)
    k = torch.minimum((u * counts).long(), counts - 1)  # k-th True voxel, 0-based
    return _kth_true(pool, k, blocks)


@torch.no_grad()
def next_clicks(pred: torch.Tensor, target: torch.Tensor, click_index: int,
                generator: torch.Generator, edt_clicks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One new click per sample.

    Args:
        pred: (B, X, Y, Z) bool, the current SAM mask.
        target: (B, X, Y, Z) bool, the mask the clicks steer towards (the specialist's foreground).
        click_index: 0-based index of this click in the interaction.
        generator: torch.Generator for the random clicks (any device; draws move to ``pred``'s device).
        edt_clicks: clicks with ``click_index < edt_clicks`` use the deepest point of the largest error
            region; later ones a random error voxel.

    Returns:
        coords (B, 1, 3) int64 voxel indices (X, Y, Z order) and labels (B, 1) int64 in {0, 1},
        on ``pred``'s device.
    """
    _check_masks(pred, target)
    pred, target = pred.bool(), target.bool()
    batch, shape = pred.shape[0], pred.shape[1:]
    pred_flat, target_flat = pred.flatten(1), target.flatten(1)
    error = pred_flat ^ target_flat
    has_error = _any(error, 1)
    if bool(has_error.all()):
        pool = error  # where random clicks may land
        no_error_positive = torch.zeros_like(has_error)
    else:
        target_any = _any(target_flat, 1).unsqueeze(1)
        fallback = torch.where(target_any, target_flat, torch.ones_like(target_flat))
        pool = torch.where(has_error.unsqueeze(1), error, fallback)
        # without any error the click confirms the target (positive) or marks background (negative)
        no_error_positive = ~has_error & target_any.squeeze(1)
    if click_index < edt_clicks:
        deepest = _deepest_voxels(target & ~pred, pred & ~target)
        flat = torch.tensor([int(np.ravel_multi_index(v, tuple(shape))) if v is not None else -1
                             for v in deepest], dtype=torch.long).to(pred.device)
        if any(v is None for v in deepest):  # samples without error fall back to a random voxel
            flat = torch.where(flat < 0, _random_voxel(pool, generator), flat)
    else:
        flat = _random_voxel(pool, generator)

    at = flat.unsqueeze(1)
    false_negative_at_click = (target_flat.gather(1, at) & ~pred_flat.gather(1, at)).squeeze(1)
    labels = (false_negative_at_click | no_error_positive).long().unsqueeze(1)
    coords = torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1).unsqueeze(1)
    return coords.long(), labels


def accumulate_clicks(history: tuple[torch.Tensor, torch.Tensor] | None, coords: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append new clicks to the ones so far (SAM-Med3D passes all clicks at every iteration).

    Args:
        history: None or (coords (B, N, 3), labels (B, N)).
        coords: (B, K, 3); labels: (B, K).
    Returns:
        (coords (B, N+K, 3), labels (B, N+K)).
    """
    if coords.dim() != 3 or coords.shape[-1] != 3 or labels.shape != coords.shape[:2]:
        raise ValueError(f"accumulate_clicks expects coords (B, K, 3) and labels (B, K); got "
                         f"{tuple(coords.shape)} and {tuple(labels.shape)}")
    if history is None:
        return coords, labels
    old_coords, old_labels = history
    if old_coords.shape[0] != coords.shape[0]:
        raise ValueError(f"accumulate_clicks: batch size {coords.shape[0]} differs from the "
                         f"history's {old_coords.shape[0]}")
    return torch.cat([old_coords, coords], dim=1), torch.cat([old_labels, labels], dim=1)
