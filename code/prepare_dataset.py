"""Prepare your own NIfTI dataset (nnU-Net v2 / Decathlon layout) for training and prediction.

    python prepare_dataset.py --src ../data/Dataset001_Heart --dst ../data/prepared/Heart [--spacing 1.5 1.5 1.5]
                              [--modality mri|ct] [--test_fraction 0.2] [--seed 0]

Reads ``<src>/dataset.json``, ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz`` (images without a
label are the unlabeled pool), and writes training-ready cases, ``train.list`` / ``labeled.list`` /
``unlabeled.list`` / ``test.list`` and ``dataset.json`` (with the geometry to map predictions back) under
``--dst``. See ``dataloaders/prepare.py`` for every step. Rerunning skips the cases already prepared with the
same inputs and settings; an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse

from dataloaders.prepare import MODALITIES, prepare_dataset
from utils.cli import HelpFormatter
from utils.errors import run_entry

SPACING = None          # None: the dataset's median spacing; SAM-Med3D users often take 1.5 1.5 1.5 (mm)
MODALITY = "mri"
TEST_FRACTION = 0.2     # of the labeled cases, held out as test.list (seeded)
SEED = 0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--src", required=True, help="the nnU-Net / Decathlon dataset folder (holds dataset.json)")
    p.add_argument("--dst", required=True, help="the prepared folder to write (train with --root_path <dst>/cases)")
    p.add_argument("--spacing", type=float, nargs=3, default=SPACING, metavar=("X", "Y", "Z"),
                   help="target voxel spacing in mm (default: the dataset's median spacing)")
    p.add_argument("--modality", choices=MODALITIES, default=MODALITY,
                   help="intensity normalisation: mri = z-score inside the body; ct = clip to the foreground "
                        "0.5-99.5 percentiles, then z-score")
    p.add_argument("--test_fraction", type=float, default=TEST_FRACTION,
                   help="fraction of the labeled cases held out as test.list")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the test split")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    progress = (lambda it, **kw: it)
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm
    info = prepare_dataset(args.src, args.dst, args.spacing, args.modality, args.test_fraction, args.seed,
                           progress=progress)
    print(f"{args.dst}: {info['n_labeled_train']} labeled training, {info['n_unlabeled']} unlabeled and "
          f"{info['n_test']} test cases; {info['num_classes']} classes {info['class_names']}; spacing "
          f"{[round(s, 4) for s in info['spacing']]} mm; train with --root_path {args.dst}/cases "
          f"--labeled_num {info['n_labeled_train']}")
    return info


if __name__ == "__main__":
    run_entry(main)
