"""Evaluate a student on the test cases of a prepared dataset, per class (test_LA.py for any prepared dataset).

    python test.py --dataset ../data/prepared/Heart --model_path ../model/Heart/MT/iter_6000.pth

Sliding window over every case of ``<dataset>/test.list`` (or ``--test_list``), the largest component of each
class kept (``--no_post`` keeps all), then Dice, Jaccard, HD95 and ASD per foreground class, with distances in
millimetres from the dataset's spacing. A class absent from both the ground truth and the prediction of a case
is left out of that class's mean (NaN in the CSV). Writes ``metrics.csv`` (one row per case and class) and
``summary.json`` (per class and the mean over classes) in ``--out_dir``.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from dataloaders.la_heart import read_list
from dataloaders.prepare import CASES_DIR
from predict import dataset_settings
from utils.cli import HelpFormatter, add_threads_flag, add_window_flags, apply_runtime_flags
from utils.errors import run_entry
from utils.inference import evaluate_classes, load_for_classes, window_for

PATCH_SIZE = (112, 112, 80)     # used when no config.json lies beside the checkpoint
STRIDE_XY = 18
STRIDE_Z = 4
METRICS = ("dice", "jaccard", "hd95", "asd")


def summarize_classes(records: list[dict], class_names: list[str]) -> dict:
    """{'per_class': {name: {'mean': {...}, 'std': {...}, 'n': cases scored}}, 'mean_over_classes': {...}}."""
    per_class = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        values = {m: np.array([r["classes"][k][m] for r in records], dtype=np.float64) for m in METRICS}
        scored = np.isfinite(values["dice"])
        per_class[name] = {"mean": {m: float(v[scored].mean()) if scored.any() else float("nan")
                                    for m, v in values.items()},
                           "std": {m: float(v[scored].std()) if scored.any() else float("nan")
                                   for m, v in values.items()},
                           "n": int(scored.sum())}
    means = {m: float(np.nanmean([c["mean"][m] for c in per_class.values()])) for m in METRICS}
    return {"per_class": per_class, "mean_over_classes": means}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, help="a folder written by prepare_dataset.py")
    p.add_argument("--model_path", required=True, help="student checkpoint (iter_N.pth, released .pth, train_state.pth)")
    p.add_argument("--test_list", default=None, help="case list (default <dataset>/test.list)")
    p.add_argument("--out_dir", default=None, help="default: <checkpoint folder>/test_<checkpoint name>")
    add_window_flags(p, STRIDE_XY, STRIDE_Z, PATCH_SIZE)
    p.add_argument("--no_post", dest="post_process", action="store_false",
                   help="keep every component (default: the largest of each class)")
    add_threads_flag(p)
    args = p.parse_args(argv)
    device = apply_runtime_flags(args)
    info = dataset_settings(args.dataset)
    names = info["class_names"]
    cases = read_list(args.test_list or Path(args.dataset) / "test.list")
    net, _ = load_for_classes(args.model_path, names, device)
    patch = window_for(args.model_path, args.patch_size, PATCH_SIZE)
    ckpt = Path(args.model_path)
    out_dir = Path(args.out_dir) if args.out_dir else ckpt.parent / f"test_{ckpt.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = evaluate_classes(net, Path(args.dataset) / CASES_DIR, cases, len(names), patch_size=tuple(patch),
                               stride_xy=args.stride_xy, stride_z=args.stride_z, post_process=args.post_process,
                               spacing=tuple(info["spacing"]), amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
                               device=device)
    summary = summarize_classes(records, names)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class", "dice", "jaccard", "hd95_mm", "asd_mm"])
        for r in records:
            for k, m in r["classes"].items():
                w.writerow([r["case"], names[k]] + [repr(m[x]) for x in METRICS])
    summary.update(checkpoint=str(ckpt), dataset=str(args.dataset), n_cases=len(records), distance_unit="mm",
                   patch_size=list(patch), stride_xy=args.stride_xy, stride_z=args.stride_z,
                   post_process=args.post_process, amp=args.amp, std_kind="population (ddof=0)",
                   cases=[{"case": r["case"], "classes": {names[k]: m for k, m in r["classes"].items()}}
                          for r in records])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = f"{'class':<20} {'n':>3} {'Dice %':>8} {'Jaccard %':>10} {'HD95 mm':>9} {'ASD mm':>8}"
    print(header + "\n" + "-" * len(header))
    for name, c in list(summary["per_class"].items()) + [("mean over classes", {"mean": summary["mean_over_classes"],
                                                                                "n": len(records)})]:
        m = c["mean"]
        print(f"{name:<20} {c['n']:>3} {100 * m['dice']:>8.2f} {100 * m['jaccard']:>10.2f} {m['hd95']:>9.2f} "
              f"{m['asd']:>8.2f}")
    print(f"-> {out_dir}")
    return summary


if __name__ == "__main__":
    run_entry(main)
