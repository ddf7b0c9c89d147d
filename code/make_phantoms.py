"""Write a synthetic LA-like phantom dataset in the LA layout (for demos without the real data).

    python make_phantoms.py --out ../data/phantoms --n_train 16 --n_test 4 --size 128 112 80 --seed 0

writes ``<out>/2018LA_Seg_Training Set/PHANTOM_###/mri_norm2.h5``, ``<out>/train.list`` and ``<out>/test.list``;
every training/test script then reads it with ``--root_path <out>/2018LA_Seg_Training Set`` exactly as it
reads the real data. The same seed gives byte-identical arrays; see dataloaders/phantoms.py for the model.
"""
from __future__ import annotations

import argparse
import sys
import time

from dataloaders.layout import TRAINING_FOLDER, repo_default
from dataloaders.phantoms import DEFAULT_SIZE, write_phantom_dataset
from utils.errors import run_entry

OUT = "../data/phantoms"
N_TRAIN = 80
N_TEST = 20
SIZE = DEFAULT_SIZE
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=repo_default(OUT), help="dataset folder to create (default %(default)s)")
    parser.add_argument("--n_train", type=int, default=N_TRAIN, help="cases in train.list (default %(default)s)")
    parser.add_argument("--n_test", type=int, default=N_TEST, help="cases in test.list (default %(default)s)")
    parser.add_argument("--size", type=int, nargs=3, default=list(SIZE), metavar=("X", "Y", "Z"),
                        help="volume size in voxels (default %(default)s, the LA crop size)")
    parser.add_argument("--seed", type=int, default=SEED, help="dataset seed (default %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Write the dataset; returns 0. Bad arguments raise PhantomError (a ProjectError) naming them."""
    args = parse_args(argv)
    start = time.time()
    splits = write_phantom_dataset(args.out, args.n_train, args.n_test, tuple(args.size), args.seed,
                                   progress=True)
    print(f"wrote {len(splits['train'])} train + {len(splits['test'])} test phantoms of size "
          f"{tuple(args.size)} to {args.out}/{TRAINING_FOLDER} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
