"""Evaluate a V-Net specialist on the LA test list (UA-MT's protocol, with the official defects fixed).

From code/ (or the repository root as python code/test_LA.py; default paths are the same):
    python test_LA.py --exp LA/SemiSAM_MT --iteration 6000
    python test_LA.py --model_path ../model/LA/SemiSAM_MT/train_state.pth --device cuda --amp bf16

Protocol (as published for LA): the checkpoint of the last iteration (6000), sliding window 112x112x80
with stride 18 (X, Y) / 4 (Z), largest-connected-component post-processing, Dice / Jaccard / HD95 / ASD
per case and their mean. Differences from the official script: distances in mm (0.625 mm spacing) unless
--spacing 0; an empty prediction scores the worst distance instead of a perfect 0; post-processing
does not crash on an empty prediction; NIfTI files carry the spacing. The test set is only ever
scored here: nothing in this script picks a checkpoint by its test score (use a validation split).

Outputs in --out_dir: metrics.csv (one row per case), summary.json (settings, per-case values, mean and
population std), and <case>_pred/_img/_gt.nii.gz unless --no_save_nii.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dataloaders.la_heart import check_data_folder, list_path, load_case, read_list
from utils.bf16 import require_native_bf16
from dataloaders.layout import repo_default
from utils.cli import HelpFormatter, add_threads_flag, apply_threads_flag
from utils.errors import CheckpointError, run_entry
from utils.inference import DEFAULT_WINDOW, checkpoint_path, evaluate, load_specialist, window_for

# default paths are relative to code/ (resolved by dataloaders.layout.repo_default, so they name the same folders
# from any working directory); paths given as flags are relative to the working directory
ROOT_PATH = "../data/2018LA_Seg_Training Set"
TEST_LIST = None                   # None: <ROOT_PATH>/../test.list
MODEL_DIR = "../model"             # where the training scripts write <exp>/
MODEL_PATH = None                  # explicit checkpoint file; None: <MODEL_DIR>/<EXP>/iter_<ITERATION>.pth
EXP = "LA/SemiSAM_MT"               # train_LA_semisam_mt.py's EXP
ITERATION = 6000                   # or "best" -> best_model.pth
PATCH_SIZE = None                  # None: the training patch (config.json beside the checkpoint), else DEFAULT_PATCH
DEFAULT_PATCH = DEFAULT_WINDOW     # UA-MT's test_LA.py window (SemiSAM's evaluates with its 128^3 training patch)
STRIDE_XY = 18
STRIDE_Z = 4
NUM_CLASSES = 2
POST_PROCESS = True
SAVE_NII = True
SPACING = (0.625, 0.625, 0.625)    # mm per voxel; None -> distances in voxels
OUT_DIR = None                     # None: <MODEL_DIR>/prediction/<EXP>_post (or next to MODEL_PATH)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP = "none"                       # "bf16": autocast the forward passes in bfloat16
WINDOW_BATCH = 4
MAX_CASES = None                   # evaluate only the first N cases (smoke tests)
THREADS = 0                        # torch CPU threads; 0: the cores left idle by the current load

METRICS = ("dice", "jaccard", "hd95", "asd")


def _spacing(values):
    if values is None:
        return None
    if len(values) == 1 and str(values[0]).lower() in ("0", "none", "0.0"):
        return None
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--spacing expects 1 or 3 numbers or 'none', got {values}") from None
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3 or any(n <= 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"--spacing expects 1 or 3 positive numbers or 0/none, got {values}")
    return tuple(numbers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="Default paths name the repository's data/ and model/ folders from any\n"
                                       "working directory; paths you give are relative to the working directory.")
    p.add_argument("--root_path", default=repo_default(ROOT_PATH), help="folder of case folders")
    p.add_argument("--test_list", default=TEST_LIST, help="case list (default <root_path>/../test.list)")
    p.add_argument("--model_path", default=MODEL_PATH, help="checkpoint file (overrides --exp/--iteration)")
    p.add_argument("--exp", default=EXP, help="experiment name: checkpoints in <model_dir>/<exp>/")
    p.add_argument("--model_dir", default=repo_default(MODEL_DIR), help="parent folder of the experiments")
    p.add_argument("--iteration", default=str(ITERATION), help="N for iter_N.pth, or 'best' for best_model.pth")
    p.add_argument("--patch_size", type=int, nargs=3, default=None if PATCH_SIZE is None else list(PATCH_SIZE),
                   metavar=("X", "Y", "Z"), help=f"sliding window (default: the training patch from config.json "
                                                 f"beside the checkpoint, else {' '.join(map(str, DEFAULT_PATCH))})")
    p.add_argument("--stride_xy", type=int, default=STRIDE_XY, help="sliding-window stride along X and Y")
    p.add_argument("--stride_z", type=int, default=STRIDE_Z, help="sliding-window stride along Z")
    p.add_argument("--no_post", dest="post_process", action="store_false", default=POST_PROCESS,
                   help="turn off the largest-connected-component post-processing (on by default)")
    p.add_argument("--no_save_nii", dest="save_nii", action="store_false", default=SAVE_NII,
                   help="write no <case>_pred/_img/_gt.nii.gz (written by default)")
    p.add_argument("--out_dir", default=OUT_DIR, help="output folder (None: <model_dir>/prediction/<exp>_post, or "
                                                      "prediction/ beside --model_path)")
    p.add_argument("--device", default=DEVICE, help="cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("none", "bf16"), default=AMP, help="autocast dtype of the forward passes")
    p.add_argument("--window_batch", type=int, default=WINDOW_BATCH, help="windows per forward pass")
    add_threads_flag(p, THREADS)
    p.add_argument("--n_filters", type=int, default=None, help="override the checkpoint's width")
    p.add_argument("--normalization", default=None, choices=("batchnorm", "groupnorm", "instancenorm", "none"),
                   help="override the checkpoint's normalization")
    p.add_argument("--max_cases", type=int, default=MAX_CASES, help="evaluate only the first N cases")
    p.add_argument("--spacing", nargs="+", default=None if SPACING is None else [str(s) for s in SPACING],
                   help="voxel size in mm (1 or 3 numbers); 0 or none: distances in voxels")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved settings (checkpoint, list and output paths included) as JSON and exit; "
                        "reads no data, writes no file")
    args = p.parse_args(argv)
    try:
        args.spacing = _spacing(args.spacing)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    for name in ("stride_xy", "stride_z", "window_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.patch_size is not None and any(s < 16 or s % 16 for s in args.patch_size):
        p.error(f"--patch_size {tuple(args.patch_size)}: every size must be a multiple of 16 for the V-Net")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch sees no CUDA device")
    if args.max_cases is not None and args.max_cases < 1:
        p.error("--max_cases must be >= 1")
    return args


def resolve_paths(args) -> tuple[Path, Path, Path]:
    """(checkpoint file, test list, output folder) from the arguments."""
    if args.model_path:
        ckpt = Path(args.model_path)
    else:
        ckpt = checkpoint_path(Path(args.model_dir) / args.exp, args.iteration)
    test_list = Path(args.test_list) if args.test_list else list_path(args.root_path, "test")
    suffix = "_post" if args.post_process else "_nopost"
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.model_path:
        out_dir = ckpt.parent / "prediction" / f"{ckpt.stem}{suffix}"
    else:
        out_dir = Path(args.model_dir) / "prediction" / f"{args.exp}{suffix}"
    return ckpt, test_list, out_dir


def nifti_affine(spacing) -> np.ndarray:
    """4x4 affine with the voxel size on the diagonal (identity when spacing is None)."""
    return np.diag(list(spacing if spacing is not None else (1.0, 1.0, 1.0)) + [1.0])


def _case_callback(out_dir: Path, spacing, save_nii: bool, n_cases: int):
    """Called after each case: prints progress and writes <case>_pred/_img/_gt.nii.gz when asked."""
    affine = nifti_affine(spacing)
    done = []

    def on_case(case, image, label, prediction):
        done.append(case)
        print(f"[{len(done)}/{n_cases}] {case}", flush=True)
        if not save_nii:
            return
        for suffix, array in (("pred", prediction.astype(np.uint8)), ("img", image.astype(np.float32)),
                              ("gt", label.astype(np.uint8))):
            nib.save(nib.Nifti1Image(array, affine), out_dir / f"{case}_{suffix}.nii.gz")
    return on_case


def summarize(records: list[dict]) -> dict:
    """Mean and population std (ddof 0) of each metric over the cases."""
    values = {m: np.array([r[m] for r in records], dtype=np.float64) for m in METRICS}
    return {"mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std()) for m, v in values.items()}}


def format_table(records: list[dict], summary: dict, unit: str) -> str:
    header = f"{'case':<24} {'Dice %':>8} {'Jaccard %':>10} {f'HD95 {unit}':>14} {f'ASD {unit}':>14}"
    rows = [header, "-" * len(header)]
    for r in records:
        rows.append(f"{r['case']:<24} {100 * r['dice']:>8.2f} {100 * r['jaccard']:>10.2f} "
                    f"{r['hd95']:>14.2f} {r['asd']:>14.2f}")
    rows.append("-" * len(header))
    for stat in ("mean", "std"):
        v = summary[stat]
        rows.append(f"{stat:<24} {100 * v['dice']:>8.2f} {100 * v['jaccard']:>10.2f} "
                    f"{v['hd95']:>14.2f} {v['asd']:>14.2f}")
    mean, std = summary["mean"], summary["std"]
    rows.append(f"mean ± std: Dice {100 * mean['dice']:.2f} ± {100 * std['dice']:.2f} %, "
                f"Jaccard {100 * mean['jaccard']:.2f} ± {100 * std['jaccard']:.2f} %, "
                f"HD95 {mean['hd95']:.2f} ± {std['hd95']:.2f} {unit}, ASD {mean['asd']:.2f} ± {std['asd']:.2f} {unit}")
    return "\n".join(rows)


def write_csv(path: Path, records: list[dict], unit: str) -> None:
    columns = ["case", "dice", "jaccard", f"hd95_{unit}", f"asd_{unit}", "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            writer.writerow([r["case"], repr(r["dice"]), repr(r["jaccard"]), repr(r["hd95"]), repr(r["asd"]),
                             f"{r['seconds']:.3f}"])


def main(argv=None) -> dict:
    """Run the evaluation; returns the summary dict that is also written to summary.json."""
    args = parse_args(argv)
    ckpt, test_list, out_dir = resolve_paths(args)
    if args.print_config:
        print(json.dumps(dict(vars(args), model_path=str(ckpt), test_list=str(test_list), out_dir=str(out_dir)),
                         indent=2, sort_keys=True))
        return {}
    apply_threads_flag(args.threads)
    device = torch.device(args.device)
    if args.amp == "bf16":
        require_native_bf16(device)
    check_data_folder(args.root_path)
    cases = read_list(test_list)
    if args.max_cases is not None:
        cases = cases[:args.max_cases]
    net, config = load_specialist(ckpt, args.n_filters, args.normalization, device)
    args.patch_size = window_for(ckpt, args.patch_size, DEFAULT_PATCH)
    if config["n_classes"] != NUM_CLASSES:
        raise CheckpointError(f"checkpoint {ckpt} has {config['n_classes']} output classes, LA needs {NUM_CLASSES}")
    for case in cases:
        # every case decoded and checked once before out_dir is touched: a bad file (LADataError naming it)
        # leaves an earlier evaluation's files as they were, instead of half of them replaced
        load_case(args.root_path, case, with_label=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = "mm" if args.spacing is not None else "voxels"
    print(f"checkpoint {ckpt}  VNet({config})  {len(cases)} cases from {test_list}")
    print(f"patch {tuple(args.patch_size)}  stride {args.stride_xy}/{args.stride_z}  post-process "
          f"{args.post_process}  spacing {args.spacing}  device {device}  amp {args.amp}  -> {out_dir}")

    records = evaluate(
        net, args.root_path, cases, patch_size=tuple(args.patch_size), stride_xy=args.stride_xy,
        stride_z=args.stride_z, num_classes=NUM_CLASSES, post_process=args.post_process, spacing=args.spacing,
        window_batch=args.window_batch, amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        device=device, on_case=_case_callback(out_dir, args.spacing, args.save_nii, len(cases)))

    summary = summarize(records)
    print(format_table(records, summary, unit))
    write_csv(out_dir / "metrics.csv", records, unit)
    summary.update(
        checkpoint=str(ckpt), vnet=config, test_list=str(test_list), root_path=str(args.root_path),
        n_cases=len(records), distance_unit=unit, spacing=args.spacing, patch_size=list(args.patch_size),
        stride_xy=args.stride_xy, stride_z=args.stride_z, post_process=args.post_process, amp=args.amp,
        std_kind="population (ddof=0)", cases=records)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_entry(main)   # data, list and checkpoint errors: one line naming the culprit, exit status 2
