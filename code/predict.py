"""Segment new scans (no label needed) and write each prediction on the scan's own grid.

    python predict.py --model_path ../model/MyRun/iter_6000.pth --input ../data/Dataset001/imagesTs \\
                      --output ../predictions --dataset ../data/prepared/Dataset001

For every input image (a file, or each ``*.nii.gz`` / ``*.nii`` file of a folder): the preprocessing of
``prepare_dataset.py`` (reorientation, the prepared dataset's spacing and intensity normalisation, body crop;
without ``--dataset``: the scan's own spacing and an MRI z-score, as LA's h5 files were made), sliding-window
inference, optionally the largest connected component of each class, and ``<case>.nii.gz`` in ``--output``
with the input file's size, spacing, origin and orientation and the integer labels of ``dataset.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import SimpleITK as sitk
import torch

from dataloaders.prepare import DATASET_JSON, PrepareError, SourceCase, preprocess_case, to_source_grid
from utils.cli import HelpFormatter, add_threads_flag, add_window_flags, apply_runtime_flags
from utils.errors import ConfigError, run_entry
from utils.inference import (largest_component_per_class, load_for_classes, sliding_window_predict,
                             window_for)

PATCH_SIZE = (112, 112, 80)     # used when no config.json lies beside the checkpoint
STRIDE_XY = 18
STRIDE_Z = 4
ENDINGS = (".nii.gz", ".nii")


def input_files(path: Path) -> list[tuple[str, Path]]:
    """(case name, file) for a file or for each NIfTI file of a folder; the name drops the ending and an
    nnU-Net channel suffix ``_0000``."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.name.endswith(ENDINGS) and not f.name.startswith("."))
        if not files:
            raise PrepareError(f"{path}: no {' or '.join(ENDINGS)} file to segment")
    else:
        raise PrepareError(f"{path}: no such file or folder")
    out = []
    for f in files:
        stem = next(f.name[:-len(e)] for e in ENDINGS if f.name.endswith(e))
        if stem.endswith("_0000"):
            stem = stem[:-5]
        out.append((stem, f))
    return out


def dataset_settings(dataset) -> dict:
    """Spacing, modality, CT statistics and labels of a prepared dataset (dataset.json), or the defaults for
    scans prepared like LA's (own spacing, MRI z-score, binary)."""
    if dataset is None:
        return {"spacing": None, "modality": "mri", "ct_normalization": None, "labels": {"background": 0,
                                                                                        "foreground": 1}}
    path = Path(dataset) / DATASET_JSON
    if not path.is_file():
        raise PrepareError(f"{path}: not found (--dataset is a folder written by prepare_dataset.py)")
    info = json.loads(path.read_text())
    if info.get("format") != "semisam_prepared_dataset":
        raise PrepareError(f"{path}: not a prepared dataset (no 'format': 'semisam_prepared_dataset')")
    return info


def predict_case(net, case: str, image_path: Path, settings: dict, patch_size, stride_xy: int, stride_z: int,
                 amp_dtype, device, lcc: bool, num_classes: int) -> sitk.Image:
    """The label map of one scan as a SimpleITK image on the scan's own grid."""
    spacing = settings["spacing"]
    if spacing is None:           # keep the scan's spacing (read in the reoriented axis order)
        from dataloaders.prepare import median_spacing
        spacing = median_spacing([SourceCase(case, image_path, None)])
    image, _, record = preprocess_case(SourceCase(case, image_path, None), settings["labels"], spacing,
                                       settings["modality"], settings["ct_normalization"])
    label, _ = sliding_window_predict(net, image, patch_size, stride_xy, stride_z, num_classes=num_classes,
                                      amp_dtype=amp_dtype, device=device)
    if lcc:
        label = largest_component_per_class(label)
    return to_source_grid(label, record)


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model_path", required=True, help="student checkpoint (iter_N.pth, released .pth or "
                                                        "train_state.pth)")
    p.add_argument("--input", required=True, help="a scan, or a folder of scans (.nii.gz / .nii)")
    p.add_argument("--output", required=True, help="folder for the <case>.nii.gz predictions")
    p.add_argument("--dataset", default=None, help="the prepared dataset the model was trained on (its "
                                                   "spacing, normalisation and labels)")
    add_window_flags(p, STRIDE_XY, STRIDE_Z, PATCH_SIZE)
    p.add_argument("--no_lcc", action="store_true", help="keep every component (default: the largest per class)")
    p.add_argument("--overwrite", action="store_true", help="replace existing predictions")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_threads_flag(p)
    args = p.parse_args(argv)
    device = apply_runtime_flags(args)
    settings = dataset_settings(args.dataset)
    files = input_files(Path(args.input))
    out_dir = Path(args.output)
    targets = [out_dir / f"{case}.nii.gz" for case, _ in files]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} exists ({len(existing)} of the predictions); pass --overwrite to "
                           f"replace them")
    net, config = load_for_classes(args.model_path, sorted(settings["labels"], key=settings["labels"].get), device)
    num_classes = int(config["n_classes"])
    patch = window_for(args.model_path, args.patch_size, PATCH_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    iterator = list(zip(files, targets))
    if not args.no_progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="predict", unit="scan")
    for (case, path), target in iterator:
        pred = predict_case(net, case, path, settings, tuple(patch), args.stride_xy, args.stride_z, amp_dtype,
                            device, not args.no_lcc, num_classes)
        tmp = target.with_name(f".{target.name}.tmp.nii.gz")
        sitk.WriteImage(pred, str(tmp), useCompression=True)
        tmp.replace(target)
    print(f"{len(targets)} prediction(s) in {out_dir} (patch {tuple(patch)}, stride {args.stride_xy}/"
          f"{args.stride_z}, {'no LCC' if args.no_lcc else 'largest component per class'}, {device}, amp {args.amp})")
    return targets


if __name__ == "__main__":
    run_entry(main)
