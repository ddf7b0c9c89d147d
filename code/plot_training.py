"""A run's training curves and a compact log, from its log.txt (for results/ and for checking a run's health).

    python plot_training.py --run ../model/LA/UAMT --out_dir ../results/LA_UAMT_16 --title "UA-MT, 16 labeled"

Writes ``training_curves.png`` (loss terms; the student's soft Dice on its labeled training patches, i.e.
1 - the Dice loss, which needs no validation data; learning rate and loss weights), ``training_log.csv`` (every
``--every``-th iteration's logged values) and ``training_run.json`` (iterations, resumes, the time the process
trained, the final values). A resumed run's repeated iterations count once, with their last values.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from utils.errors import ConfigError, MissingFileError, run_entry
from utils.run_log import read_run_log, save_training_curves, write_csv


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder holding log.txt (or the log.txt itself)")
    p.add_argument("--out_dir", required=True, help="where the PNG, CSV and JSON go")
    p.add_argument("--every", type=int, default=10, help="CSV: keep every N-th iteration")
    p.add_argument("--window", type=int, default=50, help="curves: trailing mean over N iterations")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    log_path = Path(args.run)
    if log_path.is_dir():
        log_path = log_path / "log.txt"
    if not log_path.is_file():
        raise MissingFileError(f"no log.txt at {log_path}")
    if args.every < 1 or args.window < 1:
        raise ConfigError(f"--every and --window must be >= 1, got {args.every} and {args.window}")
    log = read_run_log(log_path)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_training_curves(out / "training_curves.png", log, args.title, args.window)
    write_csv(out / "training_log.csv", log, args.every)
    tail = slice(max(len(log.iterations) - args.window, 0), None)
    summary = {
        "log": str(log_path), "first_iteration": int(log.iterations[0]), "last_iteration": int(log.iterations[-1]),
        "iterations_logged": int(len(log.iterations)), "resumes": log.resumes,
        "train_hours": round(log.train_seconds / 3600, 3),
        f"mean_of_last_{args.window}": {k: float(np.nanmean(v[tail])) for k, v in log.values.items()
                                         if np.isfinite(v[tail]).any()},
    }
    (out / "training_run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    run_entry(main)
