"""Synthetic multi-object 3-D shape corpus for promptable-segmentation pretraining (generated on the fly).

Each sample is an ``img_size``^3 volume holding 2-6 objects on a textured, noisy background, with an instance
map; the training target is the visible mask of ONE randomly chosen object. Object kinds:

- ``blob``: a rotated ellipsoid whose surface is pushed in and out by smooth noise;
- ``tube``: a curved tube (quadratic Bezier centre line, constant or tapering radius), often leaving the volume;
- ``shell``: a hollow ellipsoidal shell (only the wall is the object; its inside shows the background).

Tubes and shell walls are at least ``MIN_THICKNESS`` * S thick (radius of a tube, wall of a shell: 3.5 voxels
at S = 64). A SAM-Med3D-architecture generalist sees 8-voxel tokens and answers on a grid 4x finer (2 voxels at
patch 8), so a thinner target is mostly boundary at its resolution: in the first corpus two thirds of the
targets were 1-3 voxels thick and a generalist trained on it stalled far below its targets on every kind.

Every object has its own contrast (brighter OR darker than the background, by 0.8-2.5 background units) and its
own texture; later objects occlude earlier ones in the instance map. Acquisition: optional gaussian blur,
smooth multiplicative bias, gaussian noise, z-score over the volume.

How it differs from the LA phantoms (``dataloaders.phantoms``), on purpose, so that a generalist pretrained here
has never seen the demo's target: objects are placed independently, so no target is ever a multi-lobed body
with four tubes joined to it (a tube is a separate instance even where it happens to cross a blob: the target
is never the union), and there is no cardiac context (no bright pool wrapped in a dark wall next to
same-brightness unlabelled neighbours, no lungs, no Rician noise). A blob target is a generic convex-ish shape;
what the corpus lacks is the atrium's compound topology and surroundings.

Determinism: sample ``i`` of a corpus with ``seed`` draws only from ``SeedSequence(seed, spawn_key=(i,))``
(:func:`corpus_rng`), so any sample is a pure function of (seed, i, img_size).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from dataloaders.phantoms import bezier, ellipsoid_radius, random_rotation, smooth_field, tube_sdf
from utils.errors import ConfigError

__all__ = ["OBJECT_KINDS", "MIN_IMG_SIZE", "MIN_THICKNESS", "ShapeCorpusError", "corpus_rng", "sample_scene",
           "sample", "sample_targets", "ShapeCorpus"]

OBJECT_KINDS = ("blob", "tube", "shell")
MIN_IMG_SIZE = 16
# tube radius and shell wall, as fractions of the cube's side: U(MIN_THICKNESS, 2 * MIN_THICKNESS) * S
MIN_THICKNESS = 0.055


class ShapeCorpusError(ConfigError):
    """Bad arguments of the shape corpus (e.g. an architecture's image size); a ValueError."""


def _check_img_size(img_size) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size < MIN_IMG_SIZE:
        raise ShapeCorpusError(f"img_size must be an integer >= {MIN_IMG_SIZE}, got {img_size!r}")
    return int(img_size)


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ShapeCorpusError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def corpus_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of sample ``index`` of the corpus with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _object_mask(rng: np.random.Generator, kind: str, s: int) -> np.ndarray:
    """Bool mask (s,s,s) of one object of ``kind``."""
    shape = (s, s, s)
    centre = rng.uniform(0.15, 0.85, 3) * (s - 1)
    if kind == "blob":
        r = ellipsoid_radius(shape, centre, rng.uniform(0.07, 0.25, 3) * s, random_rotation(rng, 180))
        return (1 - r) + rng.uniform(0.0, 0.15) * smooth_field(rng, shape, (4, 4, 4)) > 0
    if kind == "shell":
        radii = rng.uniform(0.15, 0.3, 3) * s
        r = ellipsoid_radius(shape, centre, radii, random_rotation(rng, 180))
        # a wall of w voxels along the shortest axis is w / r_min in normalised radius (thicker along the others)
        wall = rng.uniform(MIN_THICKNESS, 2 * MIN_THICKNESS) * s / radii.min()
        return (r < 1) & (r > 1 - min(wall, 0.7))
    if kind == "tube":
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(0.4, 1.1) * s
        p0 = centre - direction * length / 2
        p2 = centre + direction * length / 2
        p1 = centre + rng.standard_normal(3) * 0.2 * s
        pts = bezier(p0, p1, p2)
        radii = np.linspace(1.0, rng.uniform(0.7, 1.0), len(pts)) * rng.uniform(MIN_THICKNESS, 2 * MIN_THICKNESS) * s
        return tube_sdf(shape, pts, radii, reach=0.0) < 0
    raise ShapeCorpusError(f"unknown object kind {kind!r}; expected one of {OBJECT_KINDS}")


def sample_scene(rng: np.random.Generator, img_size: int, n_objects: int | None = None):
    """One multi-object scene.

    Returns (image (S,S,S) float32 z-scored, instances (S,S,S) int16 with 0 = background and k = object k
    (1-based, in painting order; later objects occlude earlier ones), kinds list[str] of the objects).
    """
    s = _check_img_size(img_size)
    shape = (s, s, s)
    n = int(rng.integers(2, 7)) if n_objects is None else int(n_objects)
    if n < 1:
        raise ShapeCorpusError(f"n_objects must be >= 1, got {n_objects!r}")
    background_cells = (int(rng.integers(2, 6)),) * 3
    image = rng.uniform(0.1, 0.5) * smooth_field(rng, shape, background_cells)
    instances = np.zeros(shape, np.int16)
    kinds = []
    for k in range(1, n + 1):
        kind = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
        mask = _object_mask(rng, kind, s)
        level = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 2.5)
        texture = rng.uniform(0.0, 0.5) * smooth_field(rng, shape, (int(rng.integers(3, 9)),) * 3)
        image[mask] = (level + texture)[mask]
        instances[mask] = k
        kinds.append(kind)
    blur = rng.uniform(0.0, 1.0)
    if blur > 0.3:
        image = ndimage.gaussian_filter(image, blur, mode="nearest")
    image = image * np.exp(0.15 * smooth_field(rng, shape, (2, 2, 2)))
    image = image + rng.uniform(0.05, 0.4) * rng.standard_normal(shape, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), instances, kinds


def sample_targets(rng: np.random.Generator, img_size: int, n_targets: int = 1):
    """One scene and ``n_targets`` of its objects as targets: (image (1,S,S,S) float32 z-scored, masks
    (n_targets,S,S,S) uint8 {0,1}), each mask the visible part of one object with at least max(20, S^3/2000)
    voxels, distinct objects in a random order (repeated cyclically when the scene has fewer eligible objects);
    scenes without one are redrawn from the same generator."""
    s = _check_img_size(img_size)
    n_targets = _check_count(n_targets, "n_targets")
    min_voxels = max(20, s ** 3 // 2000)
    while True:
        image, instances, _ = sample_scene(rng, s)
        counts = np.bincount(instances.ravel().astype(np.int64), minlength=1)[1:]
        eligible = np.flatnonzero(counts >= min_voxels) + 1
        if eligible.size:
            order = eligible[rng.permutation(eligible.size)]
            masks = np.stack([instances == order[j % order.size] for j in range(n_targets)])
            return image[None], masks.astype(np.uint8)


def sample(rng: np.random.Generator, img_size: int):
    """One training pair: (image (1,S,S,S) float32 z-scored, mask (S,S,S) uint8 {0,1}), the first target of
    :func:`sample_targets` (the same draws)."""
    image, masks = sample_targets(rng, img_size, 1)
    return image, masks[0]


class ShapeCorpus(Dataset):
    """Map-style view of the corpus: item ``i`` is a pure function of (seed, i, img_size, targets), so a
    DataLoader with any number of workers, or a resumed run, sees exactly the same samples.

    __getitem__(i) -> dict(image torch.float32 (1,S,S,S), label torch.uint8 (S,S,S) with ``targets`` = 1, else
    (targets,S,S,S): several objects of the same scene, prompted separately on one image encoding; idx int).
    """

    def __init__(self, img_size: int, seed: int = 0, length: int = 2 ** 31 - 1, targets: int = 1):
        self.img_size = _check_img_size(img_size)
        self.seed = int(seed)
        self.length = int(length)
        self.targets = _check_count(targets, "targets")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"ShapeCorpus index {index} out of range [0, {self.length})")
        image, masks = sample_targets(corpus_rng(self.seed, index), self.img_size, self.targets)
        label = masks[0] if self.targets == 1 else masks
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "idx": index}
