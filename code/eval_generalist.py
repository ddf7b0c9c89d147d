"""How good is a generalist on its own? Dice with clicks simulated from the ground truth.

    python eval_generalist.py --generalist ../ckpt/demo_generalist.pth --phantoms ../data/phantoms

scores a SAM-Med3D-architecture generalist (a checkpoint, or ``--random_arch <name|json>`` for random weights)
with ``--num_clicks`` clicks simulated from the ground truth by the generalist branch's own click protocol
(the one SemiSAM uses on the specialist's prediction; here the target is the true mask):

- on ``--corpus_scenes`` scenes of the synthetic shape corpus drawn with ``--corpus_seed`` (held out: the
  pretraining draws its scenes from another seed), each scored on its whole cube;
- zero-shot on the cases of ``--list`` (default ``<data>/test.list``) of the labeled collection ``--data``
  (e.g. the phantoms, or the LA data), each in the crop of ``--patch_size`` centred on the target, as a
  training patch around the atrium would be.

It prints the mean Dice of each and writes ``--out`` (JSON: settings, machine, per-scene / per-case Dice,
summaries). This reads labels: it evaluates a generalist and is never part of training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dataloaders.la_heart import check_data_folder, list_path, read_list
from dataloaders.layout import TRAINING_FOLDER
from networks.sam_med3d import load_generalist, random_generalist
from training.demo_recipe import DEFAULTS, ZERO_SHOT_CLICK_SEED, ZERO_SHOT_CLICKS
from training.pretrain import config_json_path
from utils.cli import HelpFormatter, add_threads_flag, apply_threads_flag
from utils.compare import corpus_click_scores, ground_truth_click_scores, summarize_scores
from utils.errors import ConfigError, run_entry
from utils.generalist import GeneralistBranch
from utils.io import atomic_write
from utils.runtime import machine_info, resolve_device

# the demo's protocol (training/demo_recipe.py), so this script and the demo report the same number
NUM_CLICKS = ZERO_SHOT_CLICKS
CORPUS_SCENES = 32
# the pretraining draws scenes from derived_seed(--seed, 0); any other seed gives scenes it never saw
CORPUS_SEED = 20261206
PATCH_SIZE = DEFAULTS["patch_size"]
CLICK_SEED = ZERO_SHOT_CLICK_SEED


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--generalist", help="generalist checkpoint (official format or pretrain_generalist.py's)")
    src.add_argument("--random_arch", help="score random weights of this architecture (registry name or JSON "
                                           "config) instead of a checkpoint")
    p.add_argument("--generalist_arch", default=None,
                   help="architecture of --generalist: registry name or JSON config (default: <checkpoint>.json "
                        "when it exists, else vit_b_ori)")
    p.add_argument("--random_seed", type=int, default=0, help="seed of --random_arch's weights")
    p.add_argument("--num_clicks", type=int, default=NUM_CLICKS, help="clicks per scene or case")
    p.add_argument("--corpus_scenes", type=int, default=CORPUS_SCENES, help="held-out corpus scenes (0: none)")
    p.add_argument("--corpus_seed", type=int, default=CORPUS_SEED, help="seed of the held-out scenes")
    p.add_argument("--data", default=None, help="labeled h5 collection (a folder holding '2018LA_Seg_Training "
                                                "Set/' and its lists, e.g. ../data/phantoms); none: corpus only")
    p.add_argument("--list", default=None, help="cases of --data to score (default <data>/test.list)")
    p.add_argument("--max_cases", type=int, default=0, help="score only the first N cases (0: all)")
    p.add_argument("--patch_size", type=int, nargs=3, default=list(PATCH_SIZE), metavar=("X", "Y", "Z"),
                   help="crop around each case's target (the specialist's training patch)")
    p.add_argument("--click_seed", type=int, default=CLICK_SEED, help="seed of the random (non-first) clicks")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--out", default=None, help="JSON file for the scores (default: print only)")
    add_threads_flag(p, 0)
    return p.parse_args(argv)


def _model(args, device):
    if args.random_arch:
        model = random_generalist(args.random_arch, args.random_seed)
        return model.to(device), f"random weights of {args.random_arch} (seed {args.random_seed})"
    arch = args.generalist_arch
    if arch is None:
        beside = config_json_path(args.generalist)
        arch = str(beside) if beside.is_file() else "vit_b_ori"
    return load_generalist(args.generalist, arch=arch, device=device), f"{args.generalist} ({arch})"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_clicks < 1 or args.corpus_scenes < 0 or args.max_cases < 0:
        raise ConfigError("--num_clicks must be >= 1, --corpus_scenes and --max_cases >= 0")
    if args.corpus_scenes == 0 and not args.data:
        raise ConfigError("nothing to score: give --data and/or --corpus_scenes > 0")
    threads = apply_threads_flag(args.threads)
    device = resolve_device(args.device)
    cases, base = [], None
    if args.data:
        root = Path(args.data)
        base = root / TRAINING_FOLDER
        check_data_folder(base)
        cases = read_list(args.list or list_path(base, "test"))
        cases = cases[:args.max_cases] if args.max_cases else cases
    model, label = _model(args, device)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"generalist: {label}; {args.num_clicks} clicks from the ground truth; {threads} thread(s)")
    branch = GeneralistBranch(model, prompt="point", num_clicks=args.num_clicks,
                              generator=torch.Generator().manual_seed(args.click_seed))
    result = dict(generalist=label, num_clicks=args.num_clicks, machine=machine_info(device))
    start = time.time()
    if args.corpus_scenes:
        scenes = corpus_click_scores(branch, int(model.img_size), args.corpus_scenes, args.corpus_seed, device)
        result["corpus"] = dict(seed=args.corpus_seed, summary=summarize_scores(scenes), scenes=scenes)
        s = result["corpus"]["summary"]
        say(f"held-out corpus scenes: Dice {s['dice_mean']:.2f} +- {s['dice_std']:.2f} % (n={s['n']}, "
            f"min {s['dice_min']:.2f} %)")
    if cases:
        records = ground_truth_click_scores(branch, base, cases, args.patch_size, device)
        result["data"] = dict(root=str(args.data), patch_size=list(args.patch_size),
                              summary=summarize_scores(records), cases=records)
        s = result["data"]["summary"]
        say(f"{args.data} ({len(cases)} cases, crop {tuple(args.patch_size)}): Dice {s['dice_mean']:.2f} +- "
            f"{s['dice_std']:.2f} % (min {s['dice_min']:.2f} %)")
    result["seconds"] = round(time.time() - start, 1)
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
