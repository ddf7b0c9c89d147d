"""Prepare an nnU-Net v2 / Medical Segmentation Decathlon dataset of NIfTI scans for training and prediction.

Source layout (what researchers already have)::

    <src>/dataset.json                      channel_names, labels (name -> int, or MSD's int -> name), file_ending
    <src>/imagesTr/<case>_0000.nii.gz       one channel per case (MSD v1 names, <case>.nii.gz, work too)
    <src>/labelsTr/<case>.nii.gz            integer labels; an image without a label joins the unlabeled pool
    <src>/imagesTs/<case>_0000.nii.gz       optional; not used for training (predict.py segments them)

Prepared layout (the LA layout, so every training script reads it with ``--root_path <dst>/cases``)::

    <dst>/cases/<case>/mri_norm2.h5         image float32 (X, Y, Z), label uint8 (X, Y, Z) for labeled cases
    <dst>/cases/<case>/prepared.json        the case's geometry (to map predictions back) and fingerprint
    <dst>/train.list                        the labeled training cases first, then the unlabeled pool
    <dst>/labeled.list, unlabeled.list, test.list
    <dst>/dataset.json                      labels, classes, spacing, normalisation, counts, geometry per case

Each case: read with SimpleITK (it reads the geometry of NIfTI and every other ITK format and resamples in
physical space, so a prediction maps back onto the source grid by one resampling; NaN voxels are looked for
with nibabel, see ``_all_finite``), reoriented to identity
direction cosines (ITK's LPS), resampled to the target spacing (linear for images, nearest for labels), cropped
to the body (the voxels above the image's background floor, plus every labeled voxel) and normalised: MRI by
z-score inside the body; CT by clipping to the 0.5-99.5 percentiles of the foreground intensities of the
labeled training cases, then z-score with their foreground mean and std. Arrays are (X, Y, Z) (SimpleITK's
numpy view is (Z, Y, X)).

A case is written to temporary files and renamed into place, ``prepared.json`` last, so an interrupted run
leaves finished cases and no half-written one; a rerun with the same inputs and settings skips finished cases
(their fingerprint matches). A bad case stops the run with :class:`PrepareError`, one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import h5py
import numpy as np
import SimpleITK as sitk

from dataloaders.layout import H5_NAME      # the LA file name: a prepared folder is read like LA's
from utils.errors import DataError
from utils.io import atomic_write

CASES_DIR = "cases"
CASE_JSON = "prepared.json"
DATASET_JSON = "dataset.json"
MODALITIES = ("mri", "ct")
ORIENTATION = "LPS"                 # ITK's code for identity direction cosines
BACKGROUND_MIN_FRACTION = 0.05      # a constant floor covering this much of the scan is background
CT_PERCENTILES = (0.5, 99.5)
CT_SAMPLES_PER_CASE = 10000
FORMAT_VERSION = 1


class PrepareError(DataError):
    """A bad source dataset or case; the message names the file and what was expected."""


@dataclass
class SourceCase:
    name: str
    image: Path
    label: Optional[Path]


# --------------------------------------------------------------------------------------------- source
def read_dataset_json(src: Path) -> dict:
    """The source's dataset.json, normalised to {'labels': {name: int}, 'file_ending': str, 'channels': int}."""
    path = src / "dataset.json"
    if not path.is_file():
        raise PrepareError(f"{path}: not found (an nnU-Net / Decathlon dataset folder has a dataset.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrepareError(f"{path}: not valid JSON ({err})") from None
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PrepareError(f"{path}: 'labels' must map label names to integers, got {labels!r}")
    if all(str(k).lstrip("-").isdigit() for k in labels):          # MSD v1: {"0": "background", ...}
        labels = {str(v): int(k) for k, v in labels.items()}
    try:
        labels = {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise PrepareError(f"{path}: 'labels' values must be integers (nnU-Net region labels are not supported), "
                           f"got {meta['labels']!r}") from None
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise PrepareError(f"{path}: label values must be 0..K-1 with 0 the background, got {values}")
    channels = meta.get("channel_names", meta.get("modality", {"0": "?"}))
    return {"labels": labels, "file_ending": meta.get("file_ending", ".nii.gz"),
            "channels": len(channels) if isinstance(channels, dict) else 1, "channel_names": channels}


def _image_file(folder: Path, name: str, ending: str) -> Path:
    return folder / f"{name}_0000{ending}"


def scan_source(src: Path, meta: dict) -> tuple[list[SourceCase], list[SourceCase]]:
    """(imagesTr cases with or without a label, imagesTs cases), sorted by name. Checks single-channel input."""
    ending = meta["file_ending"]
    if meta["channels"] != 1:
        raise PrepareError(f"{src / 'dataset.json'}: {meta['channels']} channels ({meta['channel_names']}); only "
                           f"single-channel images are supported")
    out = []
    for folder in ("imagesTr", "imagesTs"):
        cases = []
        d = src / folder
        if not d.is_dir():
            if folder == "imagesTr":
                raise PrepareError(f"{d}: not found (expected the training images, <case>_0000{ending})")
            out.append(cases)
            continue
        for f in sorted(d.iterdir()):
            if not f.name.endswith(ending) or f.name.startswith("."):
                continue
            stem = f.name[:-len(ending)]
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                if stem[-4:] != "0000":
                    raise PrepareError(f"{f}: a second channel; only single-channel images are supported")
                stem = stem[:-5]
            label = src / "labelsTr" / f"{stem}{ending}"
            cases.append(SourceCase(stem, f, label if folder == "imagesTr" and label.is_file() else None))
        out.append(cases)
    if not out[0]:
        raise PrepareError(f"{src / 'imagesTr'}: no '*{ending}' image")
    return out[0], out[1]


def read_image(path: Path, what: str = "image") -> sitk.Image:
    """A 3-D single-component SimpleITK image; PrepareError naming the file otherwise."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise PrepareError(f"{path}: cannot read the {what} ({first[-1] if first else 'unknown error'})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise PrepareError(f"{path}: the {what} must be a 3-D single-channel volume, got {img.GetDimension()}-D "
                           f"with {img.GetNumberOfComponentsPerPixel()} component(s)")
    return img


def geometry(img: sitk.Image) -> dict:
    return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}


def check_same_grid(img: sitk.Image, lab: sitk.Image, label_path: Path) -> None:
    """The label must lie on the image's grid (size exactly, spacing/origin/direction to 1e-4 relative)."""
    a, b = geometry(img), geometry(lab)
    if a["size"] != b["size"]:
        raise PrepareError(f"{label_path}: label size {b['size']} differs from the image's {a['size']}")
    for key in ("spacing", "origin", "direction"):
        x, y = np.array(a[key]), np.array(b[key])
        if not np.allclose(x, y, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(x).max()))):
            raise PrepareError(f"{label_path}: label {key} {np.round(y, 5).tolist()} differs from the image's "
                               f"{np.round(x, 5).tolist()}")


# --------------------------------------------------------------------------------------------- one case
def to_xyz(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> (X, Y, Z) array."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def resample_to(img: sitk.Image, spacing: Sequence[float], is_label: bool) -> sitk.Image:
    """``img`` (identity direction) on a grid of ``spacing`` with the same origin and physical extent."""
    old_sp, old_size = np.array(img.GetSpacing()), np.array(img.GetSize())
    if np.allclose(old_sp, spacing, rtol=1e-6, atol=0):
        return img
    size = [max(int(round(n)), 1) for n in old_size * old_sp / np.array(spacing)]
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel = img.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), tuple(float(s) for s in spacing),
                         img.GetDirection(), 0, pixel)


def body_mask(image: np.ndarray) -> np.ndarray:
    """Voxels above the scan's constant background floor (its minimum, when it covers at least 5 % of the scan:
    zero-filled MRI background, CT padding); every voxel otherwise."""
    floor = image.min()
    at_floor = image == floor
    if at_floor.mean() >= BACKGROUND_MIN_FRACTION and not at_floor.all():
        return ~at_floor
    return np.ones(image.shape, dtype=bool)


def crop_box(mask: np.ndarray) -> list[list[int]]:
    """Half-open [[x0, x1], [y0, y1], [z0, z1]] bounding box of ``mask`` (the whole array if empty)."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append([int(idx[0]), int(idx[-1]) + 1] if idx.size else [0, mask.shape[axis]])
    return box


def normalise(image: np.ndarray, body: np.ndarray, modality: str, ct_stats: Optional[dict]) -> np.ndarray:
    """float32 (X, Y, Z): MRI z-score over ``body`` (0 outside it); CT clipped to ct_stats' percentiles and
    z-scored with its foreground mean/std."""
    image = image.astype(np.float32)
    if modality == "ct":
        lo, hi = ct_stats["clip"]
        image = np.clip(image, lo, hi)
        return ((image - ct_stats["mean"]) / max(ct_stats["std"], 1e-8)).astype(np.float32)
    vals = image[body]
    out = (image - vals.mean()) / max(float(vals.std()), 1e-8)
    out[~body] = 0.0
    return out.astype(np.float32)


def _fingerprint(case: SourceCase, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in (case.image, case.label):
        if f is not None:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _all_finite(path: Path, img: sitk.Image) -> bool:
    """No NaN or infinity in the image file. SimpleITK's NIfTI reader turns NaN voxels into 0, so NIfTI files
    are checked on nibabel's reading of the stored values."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        return bool(np.isfinite(np.asarray(nib.load(str(path)).dataobj)).all())
    return bool(np.isfinite(sitk.GetArrayViewFromImage(img)).all())


def load_oriented(case: SourceCase, labels: dict) -> tuple[sitk.Image, Optional[sitk.Image], dict]:
    """(image, label or None) reoriented to identity direction, checked; and the source geometry."""
    img = read_image(case.image)
    src_geometry = geometry(img)
    lab = None
    if case.label is not None:
        lab = read_image(case.label, "label")
        check_same_grid(img, lab, case.label)
        lab.CopyInformation(img)      # equal within tolerance: one grid for both from here on
    if not _all_finite(case.image, img):
        raise PrepareError(f"{case.image}: the image holds NaN or infinite values")
    if lab is not None:
        values = np.unique(sitk.GetArrayViewFromImage(lab))
        allowed = set(labels.values())
        bad = [v for v in values.tolist() if v not in allowed or float(v) != int(v)]
        if bad:
            raise PrepareError(f"{case.label}: label values {bad[:10]} are not in dataset.json's labels "
                               f"{sorted(allowed)}")
        lab = sitk.Cast(lab, sitk.sitkUInt8)
    img = sitk.DICOMOrient(sitk.Cast(img, sitk.sitkFloat32), ORIENTATION)
    if lab is not None:
        lab = sitk.DICOMOrient(lab, ORIENTATION)
    return img, lab, src_geometry


def preprocess_case(case: SourceCase, labels: dict, spacing: Sequence[float], modality: str,
                    ct_stats: Optional[dict]) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """One case as the network sees it: (image float32 (X, Y, Z), label uint8 (X, Y, Z) or None, record with
    the source and prepared geometry). What prepare_dataset.py writes and predict.py segments."""
    img, lab, src_geometry = load_oriented(case, labels)
    img = resample_to(img, spacing, is_label=False)
    image = to_xyz(img)
    body = body_mask(image)
    label = None
    if lab is not None:
        lab = resample_to(lab, spacing, is_label=True)
        label = to_xyz(lab).astype(np.uint8)
        body_or_label = body | (label > 0)
    else:
        body_or_label = body
    box = crop_box(body_or_label)
    sl = tuple(slice(a, b) for a, b in box)
    out_image = normalise(image, body, modality, ct_stats)[sl]
    origin = np.array(img.GetOrigin()) + np.array([a for a, _ in box]) * np.array(img.GetSpacing())
    record = {
        "case": case.name, "labeled": label is not None,
        "source_image": str(case.image), "source_label": str(case.label) if case.label else None,
        "source_geometry": src_geometry,
        "prepared_geometry": {"size": list(out_image.shape), "spacing": list(img.GetSpacing()),
                              "origin": origin.tolist(), "direction": list(img.GetDirection()),
                              "crop_box_in_resampled": box, "resampled_size": list(img.GetSize())},
    }
    return out_image, None if label is None else label[sl], record


def prepare_case(case: SourceCase, dst: Path, labels: dict, spacing: Sequence[float], modality: str,
                 ct_stats: Optional[dict], settings: dict) -> dict:
    """Write one prepared case (or keep it, when its fingerprint matches); returns its prepared.json record."""
    folder = dst / CASES_DIR / case.name
    record_path = folder / CASE_JSON
    fp = _fingerprint(case, settings)
    if record_path.is_file() and (folder / H5_NAME).is_file():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fp:
            return record
    out_image, out_label, record = preprocess_case(case, labels, spacing, modality, ct_stats)
    record = {"fingerprint": fp, **record}
    folder.mkdir(parents=True, exist_ok=True)

    def write_h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=out_image, compression="gzip")
            if out_label is not None:
                f.create_dataset("label", data=out_label, compression="gzip")

    atomic_write(folder / H5_NAME, write_h5)
    atomic_write(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    return record


# --------------------------------------------------------------------------------------------- dataset
def median_spacing(cases: Sequence[SourceCase]) -> list[float]:
    """Median voxel spacing of the cases' images in the reoriented (identity-direction) axis order."""
    spacings = []
    for c in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(c.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise PrepareError(f"{c.image}: cannot read the image header") from None
        # reorienting permutes the axes: take the spacing along each physical axis (largest direction component)
        d = np.abs(np.array(reader.GetDirection()).reshape(3, 3))
        sp = np.array(reader.GetSpacing())
        spacings.append([float(sp[int(np.argmax(d[row]))]) for row in range(3)])
    return np.median(np.array(spacings), axis=0).tolist()


def ct_statistics(cases: Sequence[SourceCase], labels: dict, spacing, seed: int = 0) -> dict:
    """Clip range and foreground mean/std of CT intensities, from a sample of every labeled training case's
    foreground voxels (after resampling, as the network will see them)."""
    rng = np.random.default_rng(seed)
    samples = []
    for c in cases:
        img, lab, _ = load_oriented(c, labels)
        image = to_xyz(resample_to(img, spacing, False))
        fg = image[to_xyz(resample_to(lab, spacing, True)) > 0]
        if fg.size:
            samples.append(rng.choice(fg, size=min(fg.size, CT_SAMPLES_PER_CASE), replace=False))
    if not samples:
        raise PrepareError("CT normalisation needs foreground voxels in the labeled training cases; none found")
    pooled = np.concatenate(samples).astype(np.float64)
    lo, hi = np.percentile(pooled, CT_PERCENTILES)
    clipped = np.clip(pooled, lo, hi)
    return {"clip": [float(lo), float(hi)], "mean": float(clipped.mean()), "std": float(clipped.std())}


def split_test(labeled: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of the labeled cases (at least one when fraction > 0), sorted."""
    if not 0 <= fraction < 1:
        raise PrepareError(f"--test_fraction must be in [0, 1), got {fraction}")
    n = int(round(fraction * len(labeled)))
    if fraction > 0:
        n = max(n, 1)
    if n >= len(labeled):
        raise PrepareError(f"--test_fraction {fraction} leaves no labeled training case ({len(labeled)} labeled)")
    order = np.random.default_rng(seed).permutation(len(labeled))
    return sorted(labeled[i] for i in order[:n])


def _write_list(path: Path, names: Sequence[str]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names)))


def prepare_dataset(src, dst, spacing: Optional[Sequence[float]] = None, modality: str = "mri",
                    test_fraction: float = 0.2, seed: int = 0, progress: Callable = lambda it, **kw: it) -> dict:
    """Prepare the whole source dataset (see the module docstring); returns the written dataset.json dict."""
    src, dst = Path(src), Path(dst)
    if modality not in MODALITIES:
        raise PrepareError(f"--modality must be one of {MODALITIES}, got {modality!r}")
    meta = read_dataset_json(src)
    train_cases, _ = scan_source(src, meta)
    labeled = [c for c in train_cases if c.label is not None]
    unlabeled = [c for c in train_cases if c.label is None]
    if not labeled:
        raise PrepareError(f"{src / 'labelsTr'}: no label matches an image of imagesTr")
    test = set(split_test([c.name for c in labeled], test_fraction, seed))
    train_labeled = [c for c in labeled if c.name not in test]
    if spacing is None:
        spacing = median_spacing(train_cases)
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise PrepareError(f"--spacing must be three positive numbers, got {spacing}")
    ct_stats = ct_statistics(train_labeled, meta["labels"], spacing, seed) if modality == "ct" else None
    settings = {"version": FORMAT_VERSION, "spacing": spacing, "modality": modality, "ct": ct_stats,
                "labels": meta["labels"]}
    records = {}
    for c in progress(train_cases, desc="prepare", unit="case"):
        records[c.name] = prepare_case(c, dst, meta["labels"], spacing, modality, ct_stats, settings)
    train_list = [c.name for c in train_labeled] + [c.name for c in unlabeled]
    _write_list(dst / "train.list", train_list)
    _write_list(dst / "labeled.list", [c.name for c in train_labeled])
    _write_list(dst / "unlabeled.list", [c.name for c in unlabeled])
    _write_list(dst / "test.list", sorted(test))
    names = sorted(meta["labels"], key=meta["labels"].get)
    info = {"format": "semisam_prepared_dataset", "version": FORMAT_VERSION, "source": str(src),
            "labels": meta["labels"], "class_names": names, "num_classes": len(names), "modality": modality,
            "spacing": spacing, "orientation": ORIENTATION, "ct_normalization": ct_stats,
            "n_labeled_train": len(train_labeled), "n_unlabeled": len(unlabeled), "n_test": len(test),
            "file_ending": meta["file_ending"], "seed": seed, "test_fraction": test_fraction,
            "cases": {k: {kk: v for kk, v in r.items() if kk != "fingerprint"} for k, r in records.items()}}
    atomic_write(dst / DATASET_JSON, lambda tmp: tmp.write_text(json.dumps(info, indent=1) + "\n"))
    return info


# --------------------------------------------------------------------------------------------- back to the source
def to_source_grid(prediction: np.ndarray, record: dict, reference: Optional[sitk.Image] = None) -> sitk.Image:
    """A prepared-grid label map (X, Y, Z) as a SimpleITK image on the case's source grid (size, spacing,
    origin, direction of the source file; nearest neighbour, 0 outside the crop), ready to write as NIfTI."""
    g = record["prepared_geometry"]
    if list(prediction.shape) != list(g["size"]):
        raise ValueError(f"prediction shape {list(prediction.shape)} differs from the prepared case's {g['size']}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(prediction.astype(np.uint8).transpose(2, 1, 0)))
    img.SetSpacing(g["spacing"])
    img.SetOrigin(g["origin"])
    img.SetDirection(g["direction"])
    s = record["source_geometry"]
    out = sitk.Resample(img, [int(v) for v in s["size"]], sitk.Transform(), sitk.sitkNearestNeighbor,
                        s["origin"], s["spacing"], s["direction"], 0, sitk.sitkUInt8)
    if reference is not None:
        out.CopyInformation(reference)
    return out
