"""Convert the raw 2018 Atrial Segmentation Challenge scans into UA-MT's ``mri_norm2.h5`` files.

Input: ``<src>/<case>/lgemri.nrrd`` (LGE-MRI) and ``<src>/<case>/laendo.nrrd`` (left-atrium mask, 255 = atrium).
Output: ``<dst>/<case>/mri_norm2.h5`` with gzip datasets ``image`` float32 (X,Y,Z) and ``label`` uint8 (X,Y,Z)
in {0,1}, plus attributes ``spacing`` (mm, X,Y,Z order), ``crop`` ((start, stop) per axis) and ``seed``.

Semantics of the official UA-MT ``dataloaders/la_heart_processing.py``, kept on purpose:

- label = (mask == 255); bounding box [min, max] (inclusive) of the label along each axis;
- pad = max(P - (max - min), 0) // 2 with P = 112, 112, 80 for x, y, z;
- start = max(min - randint(10, 20) - pad, 0), stop = min(max + randint(10, 20) + pad, size) for x then y;
  z margins randint(5, 10) are drawn too (after y) but, as in the official code, the z crop is NOT applied:
  the output keeps the full z extent (``image[minx:maxx, miny:maxy]``);
- image z-scored with the mean and std of the whole uncropped volume (float64 maths), stored as float32.

What differs: margins come from a per-case generator, SeedSequence([seed, crc32(case name)]), so conversion is
reproducible and independent of case order; the scans are read with SimpleITK and transposed from its (z,y,x)
arrays to the (x,y,z) order that the official pynrrd reading produced; empty labels, mismatched image/label
shapes and constant images (std 0, officially NaN output) raise LADataError naming the case; files are
written atomically.

CLI (run from ``code/``)::

    python -m dataloaders.la_heart_processing --src <raw root> --dst "../data/2018LA_Seg_Training Set" --seed 0 \
        [--split-like <folder with train.list and test.list>]

``--split-like`` copies those list files beside ``dst`` (into its parent, where LAHeart looks for them).
"""
from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk

from dataloaders.la_heart import LADataError, read_list
from dataloaders.layout import H5_NAME
from utils.io import atomic_write

IMAGE_NAME = "lgemri.nrrd"
LABEL_NAME = "laendo.nrrd"
LABEL_VALUE = 255
OUTPUT_SIZE = (112, 112, 80)  # the official script's patch size, used only to widen small bounding boxes
XY_MARGIN = (10, 20)          # randint bounds (high exclusive), as in the official script
Z_MARGIN = (5, 10)


def case_rng(case: str, seed: int) -> np.random.Generator:
    """Generator for one case's crop margins: depends on the seed and the case name only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(case.encode("utf-8"))]))


def read_nrrd_xyz(path, case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3-D scalar volume with SimpleITK. Returns (array (X,Y,Z) as pynrrd would give it, spacing (x,y,z) mm)."""
    path = Path(path)
    if not path.is_file():
        raise LADataError(f"LA case {case!r}: {path} not found (expected {IMAGE_NAME} and {LABEL_NAME})")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise LADataError(f"LA case {case!r}: cannot read {path} as an image: {err}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise LADataError(f"LA case {case!r}: {path} is a {img.GetDimension()}-D image with "
                          f"{img.GetNumberOfComponentsPerPixel()} components, expected a 3-D scalar volume")
    # SimpleITK arrays are indexed (z, y, x); NRRD (and pynrrd, which the official script used) is (x, y, z).
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    return np.ascontiguousarray(array), tuple(float(s) for s in img.GetSpacing())


def crop_box(label: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """Official crop of a binary (X,Y,Z) label: ((x0, x1), (y0, y1), (0, Z)); see the module docstring."""
    nz = np.nonzero(label)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) for a in nz]
    pad = [max(o - (h - l), 0) // 2 for o, l, h in zip(OUTPUT_SIZE, lo, hi)]
    box = []
    for axis, margin in ((0, XY_MARGIN), (1, XY_MARGIN), (2, Z_MARGIN)):  # draw order of the official script
        start = max(lo[axis] - int(rng.integers(*margin)) - pad[axis], 0)
        stop = min(hi[axis] + int(rng.integers(*margin)) + pad[axis], label.shape[axis])
        box.append((start, stop))
    box[2] = (0, label.shape[2])  # official quirk: z bounds are computed but never applied
    return tuple(box)


def convert_case(src_case_dir, dst_case_dir, seed: int = 0) -> dict:
    """Convert ``<src_case_dir>/{lgemri,laendo}.nrrd`` into ``<dst_case_dir>/mri_norm2.h5``.

    Returns dict(case, shape (X,Y,Z) written, spacing (x,y,z) mm, crop ((x0,x1),(y0,y1),(z0,z1)) in input voxels).
    """
    src_case_dir, dst_case_dir = Path(src_case_dir), Path(dst_case_dir)
    case = src_case_dir.name
    image, spacing = read_nrrd_xyz(src_case_dir / IMAGE_NAME, case)
    mask, _ = read_nrrd_xyz(src_case_dir / LABEL_NAME, case)
    if image.shape != mask.shape:
        raise LADataError(f"LA case {case!r}: {IMAGE_NAME} has shape {image.shape} but {LABEL_NAME} has "
                          f"{mask.shape} (X,Y,Z); expected the same grid")
    label = (mask == LABEL_VALUE).astype(np.uint8)
    if not label.any():
        raise LADataError(f"LA case {case!r}: {src_case_dir / LABEL_NAME} has no voxel equal to {LABEL_VALUE} "
                          "(empty left-atrium label)")
    box = crop_box(label, case_rng(case, seed))
    image = image.astype(np.float64)
    std = image.std()
    if not std > 0:
        raise LADataError(f"LA case {case!r}: {src_case_dir / IMAGE_NAME} is constant, cannot z-score it")
    image = ((image - image.mean()) / std).astype(np.float32)
    sl = tuple(slice(a, b) for a, b in box)
    image, label = image[sl], label[sl]

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            f.create_dataset("label", data=label, compression="gzip")
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
            f.attrs["crop"] = np.asarray(box, dtype=np.int64)
            f.attrs["seed"] = int(seed)
    atomic_write(dst_case_dir / H5_NAME, write)
    return dict(case=case, shape=tuple(image.shape), spacing=spacing, crop=box)


def find_cases(src) -> list[Path]:
    """Case folders of a raw root (those holding lgemri.nrrd), sorted by name."""
    src = Path(src)
    if not src.is_dir():
        raise LADataError(f"raw data folder not found: {src}")
    cases = sorted(p.parent for p in src.glob(f"*/{IMAGE_NAME}"))
    if not cases:
        raise LADataError(f"no case folder with {IMAGE_NAME} under {src} (expected <src>/<case>/{IMAGE_NAME})")
    return cases


def copy_split_lists(split_dir, dst, converted: set[str]) -> list[Path]:
    """Write train.list and test.list of ``split_dir`` beside ``dst`` after checking every case was converted."""
    written = []
    for name in ("train.list", "test.list"):
        cases = read_list(Path(split_dir) / name)
        missing = [c for c in cases if c not in converted]
        if missing:
            raise LADataError(f"{Path(split_dir) / name} names {len(missing)} case(s) not converted from the "
                              f"raw data, e.g. {missing[:3]}")
        target = Path(dst).parent / name
        target.write_text("".join(c + "\n" for c in cases))
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="raw root holding <case>/lgemri.nrrd and <case>/laendo.nrrd")
    parser.add_argument("--dst", required=True, help="output folder of case folders (<dst>/<case>/mri_norm2.h5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crop margins")
    parser.add_argument("--split-like", default=None,
                        help="folder with train.list and test.list to copy beside --dst (into its parent)")
    args = parser.parse_args(argv)
    cases = find_cases(args.src)
    converted = set()
    for case_dir in cases:
        info = convert_case(case_dir, Path(args.dst) / case_dir.name, args.seed)
        converted.add(info["case"])
        print(f"{info['case']}: shape {info['shape']} spacing {info['spacing']} crop {info['crop']}")
    if args.split_like is not None:
        for path in copy_split_lists(args.split_like, args.dst, converted):
            print(f"wrote {path}")
    print(f"converted {len(converted)} case(s) into {args.dst}")
    return 0


if __name__ == "__main__":
    from utils.errors import run_entry
    sys.exit(run_entry(main))
