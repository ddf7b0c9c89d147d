"""Synthetic left-atrium-like MRI phantoms in the LA dataset's layout (for demos without the real data).

A phantom is a volume (X, Y, Z) (default 190 x 140 x 88, the size of an LA crop) holding

- an irregular bright **atrium** body: the union of a main ellipsoid and a few lobes, its surface pushed in
  and out by smooth random noise;
- four **pulmonary-vein** tubes (curved quadratic Bezier centre lines, tapering radius) that start inside
  the body and leave it postero-laterally, two to each side, one superior and one inferior;
- **neighbours of the same brightness** that are NOT labelled: a ventricle-like blob (antero-inferior), a
  right-atrium-like blob across a thin septum (+X) and an aorta-like tube running along Z behind the atrium,
  each separated from the atrium by a dark wall of only 1-3 voxels, and a few bright fat-like blobs in the
  background, so the label cannot be recovered by thresholding;
- a darker myocardium-like **wall** around every blood pool, textured background tissue and dark lung-like
  regions at the sides.

Acquisition model, in this order: partial-volume blur (gaussian, sigma 0.6-1.2 voxel), smooth multiplicative
bias field (coil sensitivity, exp of 0.15-0.28 x a unit-std smooth field), Rician noise (magnitude of complex
gaussian noise, sigma 0.06-0.14 of the blood level's scale), a z-score over the volume, then the scan's own
intensity scale and offset (``INTENSITY_SCALE`` log-uniform, ``INTENSITY_OFFSET`` uniform).

Version 2 (``GENERATOR_VERSION``) widened the case-to-case variation the way scans vary (body size and lobes,
vein length and calibre, blood / tissue contrast, texture, bias field, noise, thinner gaps to the neighbours)
and added the right-atrium-like neighbour, so that two labeled cases no longer cover the population (issue
20: with version 1, mean teacher from 2 labeled phantoms was already at 84-85 % Dice). Version 3 gives each scan
its own intensity scale and offset after the z-score, as the real data has them: over the 100 LA scans of
UA-MT's ``mri_norm2.h5`` the atrium's mean intensity ranges 0.32-4.20 (10th-90th percentile 0.98-3.12) and the
mean of the rest 0.01-1.73, against 0.93-2.15 and about -0.1 for version 2, whose population two labeled
scans still covered when trained long enough (mean teacher 90.9 % against 93.1 % with all 16 labels at 600
iterations; results/demo_study.md). ``label`` = atrium body + veins (largest 26-connected component), uint8 {0, 1}.

Geometry is specified for the reference size 190 x 140 x 88 and scaled per axis to other sizes (so the label
fraction does not depend on the size); thicknesses (tube radii, walls) scale with the geometric mean.

Determinism: case ``i`` of a dataset with seed ``s`` draws from ``SeedSequence(s, spawn_key=(i,))`` only, so it
is identical whatever the number of cases written, and the same seed gives identical bytes.

The shape primitives (:func:`smooth_field`, :func:`ellipsoid_radius`, :func:`tube_sdf`, ...) are shared with
``dataloaders.shape_corpus``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from dataloaders.layout import H5_NAME, TRAINING_FOLDER
from utils.errors import ConfigError
from utils.io import atomic_write
from utils.progress import Progress

__all__ = [
    "DEFAULT_SIZE", "REFERENCE_SIZE", "GENERATOR_VERSION", "PhantomError", "Phantom", "case_name",
    "case_rng", "make_phantom", "phantom_case", "write_phantom_dataset", "ensure_phantom_dataset", "MANIFEST",
    "smooth_field", "random_rotation",
    "ellipsoid_radius", "bezier", "tube_sdf",
]

REFERENCE_SIZE = (190, 140, 88)
DEFAULT_SIZE = REFERENCE_SIZE
MIN_SIZE = 24
GENERATOR_VERSION = 3   # recorded in a dataset's manifest: a cached dataset of another version is rewritten
# each scan's intensity after the z-score: scale * z + offset (version 3; spans the LA scans' measured spread)
INTENSITY_SCALE = (0.5, 1.8)
INTENSITY_OFFSET = (0.0, 1.2)


class PhantomError(ConfigError):
    """Bad arguments of the phantom generator (size, counts, output folder); a ValueError."""


@dataclass
class Phantom:
    """One generated case. All arrays are (X, Y, Z).

    image: float32, z-scored over the volume, then scaled and offset per scan. label: uint8 {0,1}, atrium + veins.
    neighbours: uint8 {0,1}, blood of the unlabelled ventricle-like blob and aorta-like tube (for tests and
    figures; not written to the h5 file).
    """
    image: np.ndarray
    label: np.ndarray
    neighbours: np.ndarray


# ----------------------------------------------------------------------------------------------- primitives

def _axes(shape, start=(0, 0, 0)) -> list[np.ndarray]:
    """Voxel coordinates start[a] .. start[a]+shape[a]-1 along each axis, broadcastable: (X,1,1), (1,Y,1),
    (1,1,Z), float32."""
    out = []
    for a, (n, s) in enumerate(zip(shape, start)):
        view = [1, 1, 1]
        view[a] = int(n)
        out.append(np.arange(int(s), int(s) + int(n), dtype=np.float32).reshape(view))
    return out


def _rbf_basis(n: int, cells: int) -> np.ndarray:
    """(n, cells) partition-of-unity gaussian basis: row i interpolates ``cells`` coefficients at voxel i."""
    if cells == 1:
        return np.ones((n, 1), np.float32)
    centres = np.linspace(0.0, n - 1.0, cells)
    width = 0.75 * (n - 1.0) / (cells - 1)
    w = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / width) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape, cells) -> np.ndarray:
    """Smooth random field of shape ``shape`` (X,Y,Z), float32, mean ~0 and std exactly 1.

    ``cells`` (3 ints) control the correlation length: about shape/cells voxels. Separable (three small matrix
    products), so it costs a few full-volume passes instead of a 3-D spline interpolation.
    """
    coef = rng.standard_normal(tuple(int(c) for c in cells)).astype(np.float32)
    bx, by, bz = (_rbf_basis(int(n), int(c)) for n, c in zip(shape, cells))
    field = np.einsum("ia,abc->ibc", bx, coef)
    field = np.einsum("jb,ibc->ijc", by, field)
    field = np.einsum("kc,ijc->ijk", bz, field)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """(3,3) rotation about a uniformly random axis by an angle uniform in [-max, max] degrees."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def ellipsoid_radius(shape, centre, radii, rotation=None) -> np.ndarray:
    """Normalised ellipsoidal radius r(p) = |R^T (p - centre) / radii| over the grid (X,Y,Z), float32.

    r < 1 inside, r = 1 on the surface. ``rotation`` (3,3) orients the ellipsoid's axes (columns).
    """
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    d = [ax - np.float32(c) for ax, c in zip(_axes(shape), centre)]
    r2 = np.zeros(tuple(shape), np.float32)
    for j in range(3):
        q = (d[0] * np.float32(rot[0, j]) + d[1] * np.float32(rot[1, j]) + d[2] * np.float32(rot[2, j]))
        r2 += (q / np.float32(radii[j])) ** 2
    return np.sqrt(r2)


def bezier(p0, p1, p2, step: float = 0.75) -> np.ndarray:
    """Points (n, 3) along the quadratic Bezier curve p0 -> p2 with control point p1, about ``step`` apart."""
    p0, p1, p2 = (np.asarray(p, float) for p in (p0, p1, p2))
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)  # upper bound of the arc length
    t = np.linspace(0.0, 1.0, max(2, int(np.ceil(length / step)) + 1))[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def tube_sdf(shape, points, radii, reach: float) -> np.ndarray:
    """Distance to the surface of a tube = union of balls (points[k], radii[k]), negative inside.

    points (n,3) in voxels, radii (n,) or scalar. Evaluated only in the tube's bounding box grown by ``reach``
    voxels; elsewhere the result is +inf (callers only look at distances below ``reach``). float32 (X,Y,Z).
    """
    points = np.asarray(points, np.float32)
    radii = np.broadcast_to(np.asarray(radii, np.float32), (len(points),))
    out = np.full(tuple(shape), np.inf, np.float32)
    grow = float(radii.max()) + reach + 1.0
    lo = np.maximum(np.floor(points.min(0) - grow), 0).astype(int)
    hi = np.minimum(np.ceil(points.max(0) + grow) + 1, shape).astype(int)
    if np.any(hi <= lo):
        return out
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ax = _axes(hi - lo, lo)
    best = np.full(tuple(hi - lo), np.inf, np.float32)
    for p, r in zip(points, radii):
        d = np.sqrt((ax[0] - p[0]) ** 2 + (ax[1] - p[1]) ** 2 + (ax[2] - p[2]) ** 2) - r
        np.minimum(best, d, out=best)
    out[box] = best
    return out


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, direction) -> np.ndarray:
    v = rng.standard_normal(3)
    v -= v.dot(direction) * direction
    return _unit(v)


# ----------------------------------------------------------------------------------------------- the phantom

def _check_size(size) -> tuple[int, int, int]:
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise PhantomError(f"phantom size must be 3 integers (X, Y, Z), got {size!r}") from None
    if len(size) != 3 or min(size) < MIN_SIZE:
        raise PhantomError(f"phantom size must be 3 integers >= {MIN_SIZE} (X, Y, Z), got {size}")
    return size


def make_phantom(rng: np.random.Generator, size=DEFAULT_SIZE) -> Phantom:
    """Draw one LA-like case from ``rng``. See the module docstring for the anatomy and acquisition model.

    Returns a :class:`Phantom` (image float32 z-scored then scaled and offset per scan, label uint8, neighbours
    uint8), arrays of shape ``size``.
    """
    shape = _check_size(size)
    scale = np.array(shape, float) / np.array(REFERENCE_SIZE, float)  # per-axis, for positions and extents
    g = float(np.prod(scale) ** (1 / 3))                              # for thicknesses
    centre_vol = (np.array(shape, float) - 1) / 2

    def at(ref_offset):  # reference-size offset from the volume centre -> voxel position
        return centre_vol + np.asarray(ref_offset, float) * scale

    # --- atrium body: main ellipsoid + lobes, surface perturbed by smooth noise
    c0_ref = np.array([0.0, 5.0, 0.0]) + rng.uniform(-12, 12, 3)
    r0_ref = np.array([37.0, 29.0, 23.0]) * rng.uniform(0.8, 1.2, 3)
    body = 1 - ellipsoid_radius(shape, at(c0_ref), r0_ref * scale, random_rotation(rng, 30))
    for _ in range(int(rng.integers(1, 5))):
        direction = _unit(rng.standard_normal(3))
        c_ref = c0_ref + rng.uniform(0.45, 0.7) * r0_ref * direction
        lobe = 1 - ellipsoid_radius(shape, at(c_ref), r0_ref * rng.uniform(0.35, 0.7, 3) * scale,
                                    random_rotation(rng, 60))
        np.maximum(body, lobe, out=body)
    body += rng.uniform(0.05, 0.15) * np.clip(smooth_field(rng, shape, (7, 6, 5)), -2.5, 2.5)
    atrium = body > 0

    # --- pulmonary veins: left pair towards -X, right pair towards +X, leaving posteriorly (-Y)
    walls_w = max(1.5, 2.2 * g)
    veins = np.zeros(shape, bool)
    vein_sdfs = []
    for side in (-1.0, 1.0):
        for vert in (-1.0, 1.0):
            start_ref = c0_ref + r0_ref * np.array([0.55 * side, -0.45, 0.45 * vert]) \
                + rng.uniform(-3, 3, 3)
            direction = _unit(np.array([0.8 * side, -0.5, 0.35 * vert]) + 0.25 * rng.standard_normal(3))
            length = rng.uniform(30, 70)
            bend = _perpendicular(rng, direction) * length * rng.uniform(0.1, 0.3)
            pts_ref = bezier(start_ref, start_ref + direction * length / 2 + bend, start_ref + direction * length,
                             step=0.75 / max(scale.max(), 1e-3))
            radii = np.linspace(rng.uniform(4.0, 7.0), rng.uniform(2.5, 4.5), len(pts_ref)) * g
            sdf = tube_sdf(shape, centre_vol + pts_ref * scale, np.maximum(radii, 1.5), reach=walls_w + 1)
            veins |= sdf < 0
            vein_sdfs.append(sdf)

    label = _largest_component(atrium | veins)

    # --- distance to the label, needed only up to the widest gap / wall (EDT of a box, not of the volume)
    d_label = _distance_outside(label, reach=3.0 * max(g, 0.5) + walls_w + 2)

    # --- unlabelled neighbours of the same brightness, 1-3 voxel dark wall from the atrium
    gap = rng.uniform(0.7, 2.5) * max(g, 0.5)
    lv_c_ref = c0_ref + np.array([-8.0, r0_ref[1] + 24.0, -12.0]) + rng.uniform(-5, 5, 3)
    lv_r_ref = np.array([38.0, 30.0, 26.0]) * rng.uniform(0.85, 1.15, 3)
    lv_r = ellipsoid_radius(shape, at(lv_c_ref), lv_r_ref * scale, random_rotation(rng, 25))
    ventricle = lv_r < 1
    ao_x = c0_ref[0] + rng.uniform(-20, 10)
    ao_y = c0_ref[1] - r0_ref[1] - rng.uniform(5, 11)
    ao_pts_ref = bezier([ao_x, ao_y, -0.6 * REFERENCE_SIZE[2]],
                        [ao_x + rng.uniform(-12, 12), ao_y + rng.uniform(-6, 6), 0.0],
                        [ao_x + rng.uniform(-12, 12), ao_y + rng.uniform(-6, 6), 0.6 * REFERENCE_SIZE[2]],
                        step=0.75 / max(scale.max(), 1e-3))
    ao_sdf = tube_sdf(shape, centre_vol + ao_pts_ref * scale, max(2.0, rng.uniform(8.0, 11.0) * g),
                      reach=walls_w + 1)
    aorta = ao_sdf < 0
    # right-atrium-like blob on the +X side, across a thin septum
    ra_c_ref = c0_ref + np.array([r0_ref[0] + 22.0, 14.0, rng.uniform(-6, 6)]) + rng.uniform(-5, 5, 3)
    ra_r = ellipsoid_radius(shape, at(ra_c_ref), np.array([26.0, 24.0, 20.0]) * rng.uniform(0.8, 1.2, 3) * scale,
                            random_rotation(rng, 30))
    right_atrium = ra_r < 1
    neighbours = (ventricle | aorta | right_atrium) & (d_label > gap)

    # --- intensities (before acquisition): tissue, lungs, fat, walls, blood
    tissue = rng.uniform(0.28, 0.45) + 0.06 * smooth_field(rng, shape, (9, 7, 5))
    img = tissue.astype(np.float32)
    for side in (-1.0, 1.0):  # dark lung-like regions at the lateral edges
        lung_c = at([side * 88.0, -20 + rng.uniform(-10, 10), rng.uniform(-10, 10)])
        lung = ellipsoid_radius(shape, lung_c, np.array([30.0, 55.0, 60.0]) * scale * rng.uniform(0.8, 1.2, 3))
        img[lung < 1] = 0.08
    for _ in range(int(rng.integers(2, 5))):  # bright fat-like blobs, brighter than tissue, not blood
        fat_c = at(rng.uniform(-1, 1, 3) * np.array(REFERENCE_SIZE) * 0.45)
        fat = ellipsoid_radius(shape, fat_c, rng.uniform(6, 14, 3) * scale, random_rotation(rng, 90))
        img[fat < 1] = rng.uniform(0.6, 0.85)

    wall = (d_label <= walls_w) | ((lv_r < 1 + 5.0 * g / lv_r_ref.min()) & ~ventricle) \
        | ((ra_r < 1.12) & ~right_atrium) | ((ao_sdf >= 0) & (ao_sdf <= walls_w))
    for sdf in vein_sdfs:
        wall |= (sdf >= 0) & (sdf <= walls_w)
    img[wall] = 0.18

    blood = rng.uniform(0.65, 1.0)
    texture = 1 + rng.uniform(0.03, 0.1) * smooth_field(rng, shape, (12, 9, 6))
    for part in (ventricle, aorta, right_atrium):
        img[part & neighbours] = (blood * rng.uniform(0.95, 1.12) * texture)[part & neighbours]
    img[label] = (blood * texture)[label]

    # --- acquisition: partial volume, bias field, Rician noise, z-score
    img = ndimage.gaussian_filter(img, rng.uniform(0.6, 1.2), mode="nearest")
    img *= np.exp(rng.uniform(0.15, 0.28) * smooth_field(rng, shape, (3, 3, 2)))
    sigma = np.float32(rng.uniform(0.06, 0.14))
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    img = (img - img.mean()) / img.std()
    scale = np.exp(rng.uniform(np.log(INTENSITY_SCALE[0]), np.log(INTENSITY_SCALE[1])))
    img = np.float32(scale) * img + np.float32(rng.uniform(*INTENSITY_OFFSET))
    return Phantom(image=img.astype(np.float32), label=label.astype(np.uint8), neighbours=neighbours.astype(np.uint8))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component of a bool mask (a noise bump may pinch off a tiny island)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _distance_outside(mask: np.ndarray, reach: float) -> np.ndarray:
    """Euclidean distance (voxels) to ``mask`` for voxels within ``reach`` of its bounding box; +inf beyond."""
    out = np.full(mask.shape, np.inf, np.float32)
    if not mask.any():
        return out
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    m = int(np.ceil(reach)) + 1
    box = tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, n in zip(box, mask.shape))
    out[box] = ndimage.distance_transform_edt(~mask[box])
    return out


# ----------------------------------------------------------------------------------------------- datasets

def case_name(index: int) -> str:
    """'PHANTOM_000', 'PHANTOM_001', ..."""
    return f"PHANTOM_{int(index):03d}"


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` of a dataset with ``seed`` (independent of the number of cases)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def phantom_case(seed: int, index: int, size=DEFAULT_SIZE) -> Phantom:
    """Case ``index`` of the phantom dataset with ``seed``; a pure function of its arguments."""
    return make_phantom(case_rng(seed, index), size)


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("image", data=image, compression="gzip")
            h5.create_dataset("label", data=label, compression="gzip")
    atomic_write(path, write)  # a crashed run never leaves a truncated mri_norm2.h5


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PhantomError(f"{name} must be an integer >= 1 (the split list may not be empty), got {value!r}")
    return int(value)


def write_phantom_dataset(out, n_train: int = 80, n_test: int = 20, size=DEFAULT_SIZE, seed: int = 0,
                          progress: bool = False) -> dict[str, list[str]]:
    """Write an LA-layout phantom dataset::

        <out>/2018LA_Seg_Training Set/PHANTOM_###/mri_norm2.h5   (image float32, label uint8, gzip)
        <out>/train.list   (cases 0 .. n_train-1)
        <out>/test.list    (cases n_train .. n_train+n_test-1)

    Existing phantom files of the same names are overwritten. Returns {'train': [...], 'test': [...]}.
    """
    n_train, n_test = _check_count("n_train", n_train), _check_count("n_test", n_test)
    size = _check_size(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhantomError(f"output {out} exists and is not a folder")
    data_dir = out / TRAINING_FOLDER
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [case_name(i) for i in range(n_train + n_test)]
    shown = Progress(len(names), desc="phantoms", enabled=progress)
    for i in range(len(names)):
        case = phantom_case(seed, i, size)
        (data_dir / names[i]).mkdir(exist_ok=True)
        _write_h5(data_dir / names[i] / H5_NAME, case.image, case.label)
        shown.update()
    shown.close()
    splits = {"train": names[:n_train], "test": names[n_train:]}
    for split, cases in splits.items():
        (out / f"{split}.list").write_text("".join(c + "\n" for c in cases))
    return splits


MANIFEST = "phantoms.json"


def ensure_phantom_dataset(out, n_train: int, n_test: int, size, seed: int, progress: bool = False) -> str:
    """The phantom dataset of these settings in ``out``: reused when ``<out>/phantoms.json`` records the same
    settings and every file is there, else (re)written. Returns 'reused' or 'written'.

    The manifest is removed before writing and written last, so an interrupted write is never mistaken for a
    complete dataset."""
    out = Path(out)
    manifest = {"generator": "dataloaders.phantoms", "version": GENERATOR_VERSION, "size": list(size),
                "n_train": int(n_train), "n_test": int(n_test), "seed": int(seed)}
    path = out / MANIFEST
    complete = (all((out / TRAINING_FOLDER / case_name(i) / H5_NAME).is_file() for i in range(n_train + n_test))
                and (out / "train.list").is_file() and (out / "test.list").is_file())
    if complete and path.is_file() and json.loads(path.read_text()) == manifest:
        return "reused"
    path.unlink(missing_ok=True)
    write_phantom_dataset(out, n_train, n_test, tuple(size), seed, progress=progress)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return "written"
