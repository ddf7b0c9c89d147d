"""Per-case segmentation metrics with medpy's definitions, fixed for empty masks.

``calculate_metric_percase`` returns what the official UA-MT / SemiSAM ``calculate_metric_percase``
returns (medpy ``dc``, ``jc``, ``hd95``, ``asd``), computed with two Euclidean distance transforms instead
of medpy's three, on the bounding box of the two masks (same numbers; see the tests against medpy).

Definitions (A = prediction, B = ground truth, both binarised as ``!= 0``):
  - Dice = 2|A∩B| / (|A| + |B|); Jaccard = |A∩B| / |A∪B|.
  - Surface of a mask: its voxels removed by one binary erosion with the 6-connected cross (medpy's
    connectivity=1; voxels on the volume edge count as surface).
  - d(A->B): for every surface voxel of A, the Euclidean distance between voxel centres to the nearest
    surface voxel of B, scaled per axis by ``spacing``.
  - HD95 = 95th percentile (numpy linear interpolation) of d(A->B) and d(B->A) pooled together.
  - ASD = mean of d(A->B) (directed, prediction -> ground truth, as medpy ``asd``).

Units: Dice and Jaccard are fractions in [0, 1]; HD95 and ASD are in voxels when ``spacing`` is None,
otherwise in the unit of ``spacing`` (mm for LA: 0.625 mm isotropic).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def binary_dice(a, b) -> float:
    """Dice of two masks of the same shape, binarised as ``!= 0``; 1.0 when both are empty.

    ``a``, ``b``: numpy arrays or torch tensors (any device, any dtype), e.g. label maps (X, Y, Z).
    """
    a, b = _binary(a), _binary(b)
    if a.shape != b.shape:
        raise ValueError(f"binary_dice: shapes differ, {a.shape} vs {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def _binary(mask) -> np.ndarray:
    if hasattr(mask, "detach"):               # a torch tensor, possibly on a GPU
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask) != 0


def _as_spacing(spacing, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    values = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)) if np.ndim(spacing) == 0 \
        else np.asarray(spacing, dtype=np.float64)
    if values.shape != (ndim,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be None, one positive number or {ndim} positive numbers; got {spacing!r}")
    return np.ascontiguousarray(values)


def volume_diagonal(shape: Sequence[int], spacing=None) -> float:
    """Length of the volume's box diagonal, sqrt(sum((n_i * spacing_i)^2)) (voxels, or spacing units).

    It exceeds every distance between two voxel centres of the volume, so it is the score given to a
    distance metric that cannot be computed because one mask is empty.
    """
    sp = _as_spacing(spacing, len(shape))
    extent = np.asarray(shape, dtype=np.float64) * (1.0 if sp is None else sp)
    return float(np.sqrt(np.sum(extent ** 2)))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of a|b grown by one voxel (clipped to the volume).

    Erosion and distances are unchanged: every foreground voxel keeps its full neighbourhood (or its
    true volume edge), and the nearest surface voxel is always inside the box.
    """
    coords = np.nonzero(a | b)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    return a[box], b[box]


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (d(pred->gt), d(gt->pred)) as float64 1-D arrays.

    pred, gt: non-empty boolean arrays of equal shape. Units: voxels, or spacing units.
    """
    sp = _as_spacing(spacing, pred.ndim)
    pred, gt = _crop_to_union(pred, gt)
    pred_surface, gt_surface = _surface(pred), _surface(gt)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=sp)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sp)[gt_surface]
    return to_gt, to_pred


def calculate_metric_percase(pred, gt, spacing=None) -> tuple[float, float, float, float]:
    """(dice, jaccard, hd95, asd) of one case.

    Args:
        pred: prediction (X, Y, Z) array-like; non-zero = foreground.
        gt: ground truth, same shape as ``pred``; non-zero = foreground.
        spacing: None (distances in voxels), one number, or one number per axis (distances in that
            unit, e.g. mm).

    Returns python floats: dice and jaccard in [0, 1]; hd95 and asd in voxels or spacing units.

    Empty masks never flatter (the official script scored an empty prediction (0, 0, 0, 0), i.e. a
    perfect HD95/ASD of 0):
      - exactly one of pred, gt empty: dice = jaccard = 0 and hd95 = asd = the volume's box diagonal
        ``volume_diagonal(shape, spacing)``, larger than any distance two voxels of the volume can have;
      - both empty: (1.0, 1.0, 0.0, 0.0), nothing to find and nothing found.

    Raises ValueError when the shapes differ or spacing is malformed.
    """
    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth must have the same shape, got {pred.shape} and {gt.shape}")
    _as_spacing(spacing, pred.ndim)
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 0.0, 0.0
    if n_pred == 0 or n_gt == 0:
        worst = volume_diagonal(pred.shape, spacing)
        return 0.0, 0.0, worst, worst
    intersection = int(np.count_nonzero(pred & gt))
    dice = 2.0 * intersection / (n_pred + n_gt)
    jaccard = intersection / (n_pred + n_gt - intersection)
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    hd95 = float(np.percentile(np.hstack((to_gt, to_pred)), 95))
    asd = float(to_gt.mean())
    return float(dice), float(jaccard), hd95, asd
