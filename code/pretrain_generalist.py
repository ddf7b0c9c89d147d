"""Pretrain a small SAM-Med3D-architecture generalist (SAM-Med3D recipe), or fine-tune a real checkpoint.

Demo without downloads (trains 'vit_tiny_demo' on the synthetic shape corpus, which has no atrium-like
target; CPU is fine):

    python pretrain_generalist.py --iterations 2000 --out ../ckpt/demo_generalist.pth

then use it as the generalist with ``--generalist ../ckpt/demo_generalist.pth --generalist_arch
../ckpt/demo_generalist.json``. Fine-tune a real SAM-Med3D checkpoint on your own labeled h5 collection:

    python pretrain_generalist.py --arch vit_b_ori --init ../ckpt/sam_med3d_turbo.pth \\
        --data "../data/2018LA_Seg_Training Set" --data_list ../data/train.list --device cuda \\
        --lr 1e-4 --iterations 1000 --out ../ckpt/sam_med3d_finetuned.pth

Continue an interrupted run with the same flags plus ``--resume <checkpoint>``. The defaults below can be
edited here; flags override them. See training/pretrain.py for the recipe and the checkpoint format.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from networks.sam_med3d import sam_model_registry3D
from training.pretrain import PretrainConfig, pretrain
from dataloaders.layout import repo_default
from utils.cli import HelpFormatter, add_threads_flag, apply_threads_flag
from utils.errors import run_entry

OUT = "../ckpt/demo_generalist.pth"
ARCH = "vit_tiny_demo"
ITERATIONS = 2000
BATCH_SIZE = 2
LR = 8e-4
WEIGHT_DECAY = 0.1
LR_SCHEDULE = "cosine"
WARMUP = 50
CLIP_GRAD = 1.0
SEED = 1337
DEVICE = "cpu"
NUM_CLICKS = 5
TARGETS_PER_IMAGE = 1  # corpus objects prompted separately on each image encoding (4: the demo generalist's run)
NO_MASK_PROB = 0.5
PAD_PROB = 0.25
FG_PROB = 0.5
WORKERS = 0
LOG_EVERY = 50
SAVE_EVERY = 500
KEEP_EVERY = 0       # keep a copy <out stem>_iter<N>.pth every N iterations (0: none)
THREADS = 0          # torch CPU threads; 0: the cores left idle by the current load


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=repo_default(OUT),
                   help="checkpoint to write; its config goes to <out>.json (with .pth replaced) "
                        "(default %(default)s)")
    p.add_argument("--arch", default=ARCH, choices=sorted(sam_model_registry3D),
                   help="registry name of the architecture (default %(default)s)")
    p.add_argument("--arch_config", default=None, help="JSON architecture config (golden-fixture format); "
                                                       "overrides --arch")
    p.add_argument("--init", default=None, help="start from this SAM-Med3D checkpoint (fine-tuning) instead of "
                                                "random weights")
    p.add_argument("--data", default=None, help="folder of <case>/mri_norm2.h5 to fine-tune on; default: the "
                                                "synthetic shape corpus")
    p.add_argument("--data_list", default=None, help="list file of --data (default <data>/../train.list)")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="training steps")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="samples per step")
    p.add_argument("--lr", type=float, default=LR, help="AdamW learning rate (after warm-up)")
    p.add_argument("--weight_decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay")
    p.add_argument("--lr_schedule", choices=("cosine", "step", "constant"), default=LR_SCHEDULE,
                   help="learning-rate schedule after warm-up")
    p.add_argument("--warmup", type=int, default=WARMUP, help="linear warm-up iterations")
    p.add_argument("--clip_grad", type=float, default=CLIP_GRAD, help="max gradient norm, 0 = off")
    p.add_argument("--seed", type=int, default=SEED, help="seed of every random stream")
    p.add_argument("--device", default=DEVICE, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--num_clicks", type=int, default=NUM_CLICKS, help="prompt steps per sample")
    p.add_argument("--targets_per_image", type=int, default=TARGETS_PER_IMAGE,
                   help="objects of each corpus scene prompted separately on one image encoding (SAM's several "
                        "masks per image; shape corpus only)")
    p.add_argument("--no_mask_prob", type=float, default=NO_MASK_PROB,
                   help="probability that the first step has no mask prompt (else a zero mask)")
    p.add_argument("--pad_prob", type=float, default=PAD_PROB,
                   help="probability that an input is shrunk to a centred box padded with its darkest value "
                        "(the generalist branch's 'pad' geometry)")
    p.add_argument("--fg_prob", type=float, default=FG_PROB,
                   help="--data crops: probability that a crop contains foreground")
    p.add_argument("--workers", type=int, default=WORKERS, help="DataLoader worker processes")
    p.add_argument("--log_every", type=int, default=LOG_EVERY, help="log a loss line every N iterations")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY, help="write the checkpoint every N iterations")
    p.add_argument("--keep_every", type=int, default=KEEP_EVERY,
                   help="also keep a copy <out stem>_iter<N>.pth (and its .json) every N iterations; 0: none")
    add_threads_flag(p, THREADS)
    p.add_argument("--resume", default=None, help="continue the run saved in this checkpoint")
    p.add_argument("--stop_at", type=int, default=None, help="save and stop after this iteration")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved settings (training.pretrain.PretrainConfig) as JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Pretrain or fine-tune; returns 0. Bad settings, data or checkpoints raise a ProjectError (PretrainError,
    LADataError, GeneralistCheckpointError, ...) naming the flag or file."""
    args = vars(parse_args(argv))
    print_config = args.pop("print_config")
    args["progress"] = not args.pop("no_progress")
    threads = args.pop("threads")
    if print_config:
        print(json.dumps(dataclasses.asdict(PretrainConfig(**args)), indent=2, sort_keys=True, default=str))
        return 0
    apply_threads_flag(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = pretrain(PretrainConfig(**args))
    print(f"saved {result['out']} at iteration {result['iteration']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
