"""The simulated clicks of the generalist branch, by the kind of mask they are made from.

    python benchmarks/bench_clicks.py --root_path ../data --json ../results/clicks.json
    python benchmarks/bench_clicks.py --synthetic --patch 128 128 128 --noise 0.05 0.4 --threads 2

SemiSAM's first click (``utils.clicks.next_clicks`` with ``click_index`` 0: the deepest voxel of the largest
6-connected error region, by connected-component labelling and an exact Euclidean distance transform) runs
on the host CPU whatever the device, so on a GPU machine the GPU waits for it; its cost depends on the mask
it is made from. Timed here, for a batch of ``--batch`` masks of size ``--patch`` (SAM's input, default
128^3) against an empty SAM mask, as in the branch:

* ``label``: centre crops of the first training cases' ground-truth labels (the smooth masks of a trained
  specialist);
* ``noise p``: each voxel foreground with probability p (``--noise``; a barely trained specialist's
  masks are noisy: at p = 0.4 one component spans the whole volume);
* ``box + 5 % speckle``: a solid box (3/4 of each axis, 42 % of the volume) with 5 % random foreground
  around it.

Also a later, random click (``click_index`` 1) from the same masks against a SAM mask that misses the first
half (along X) of each, on ``--device``. Reported: median [min, max] milliseconds per batch over
``--steps`` calls after ``--warmup``, the mask kinds interleaved. Uses torch's thread count (``--threads``),
which is also the distance transform's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.report import markdown_table  # noqa: E402
from utils.runtime import machine_info, resolve_device  # noqa: E402


def label_masks(case_dir: Path, batch: int, patch: Sequence[int]) -> torch.Tensor:
    """(batch, *patch) bool: centre crops (zero-padded where the case is smaller) of the first training
    cases' labels."""
    from dataloaders.la_heart import CenterCrop, load_case, read_list
    cases = read_list(case_dir.parent / "train.list")[:batch]
    if len(cases) < batch:
        raise C.BenchmarkError(f"--batch {batch} needs {batch} training cases; {case_dir.parent / 'train.list'} "
                               f"lists {len(cases)}")
    crop = CenterCrop(tuple(patch))
    out = []
    for case in cases:
        image, label = load_case(case_dir, case)
        out.append(torch.from_numpy(crop({"image": image, "label": label})["label"] > 0))
    return torch.stack(out)


def synthetic_masks(batch: int, patch: Sequence[int], seed: int, noise: Sequence[float]) -> dict:
    """{name: (batch, *patch) bool} of random masks (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) + tuple(patch)
    masks = {f"noise {p:g}": torch.rand(shape, generator=g) < p for p in noise}
    box = torch.zeros(shape, dtype=torch.bool)
    box[(slice(None),) + tuple(slice(s // 8, s - s // 8) for s in patch)] = True   # 3/4 per axis: 42 %
    masks["box + 5 % speckle"] = box | (torch.rand(shape, generator=g) < 0.05)
    return masks


def bench_clicks(masks: dict, device: torch.device, warmup: int, steps: int, seed: int) -> dict:
    """Time the first click (against an empty SAM mask) and one later click per mask kind."""
    from utils.clicks import next_clicks
    calls = {}
    for name, target in masks.items():
        target = target.to(device)
        empty = torch.zeros_like(target)
        half = target.clone()
        half[:, : target.shape[1] // 2] = False        # a SAM mask with errors of both kinds
        calls[f"{name} / first"] = (lambda t=target, e=empty: next_clicks(e, t, 0, torch.Generator().manual_seed(seed)))
        calls[f"{name} / later"] = (lambda t=target, h=half: next_clicks(h, t, 1, torch.Generator().manual_seed(seed)))
    runs, outputs = C.interleaved(calls, device, warmup, steps)
    for name, out in outputs.items():
        runs[name]["clicks"] = out[0][:, 0].tolist()
        runs[name]["labels"] = out[1][:, 0].tolist()
    fractions = {name: float(t.float().mean()) for name, t in masks.items()}
    return {"runs": runs, "foreground_fraction": fractions}


def report(payload: dict) -> str:
    rows = []
    for name, run in payload["clicks"]["runs"].items():
        kind = name.rsplit(" / ", 1)[0]
        rows.append([name, f"{payload['clicks']['foreground_fraction'][kind]:.3f}", C.fmt_spread(run["wall"]),
                     C.fmt_seconds(run["cpu"]["median"])])
    head = (f"simulated clicks, batch {payload['batch']} x {'x'.join(map(str, payload['patch']))}, "
            f"{payload['warmup']} warm-up + {payload['steps']} timed calls each (interleaved), "
            f"{payload['machine']['torch_threads']} threads, tensors on {payload['device']}")
    return head + "\n" + markdown_table(["mask / click", "fg fraction", "wall median [min, max]", "CPU time"],
                                          rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=2, help="masks per call (default 2: SemiSAM's unlabeled half)")
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], metavar=("X", "Y", "Z"))
    p.add_argument("--noise", type=float, nargs="*", default=[0.05, 0.4],
                   help="foreground probabilities of the random masks (default 0.05 0.4)")
    p.add_argument("--steps", type=int, default=5, help="timed calls (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--device", default="cpu", help="where the masks live: cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    C.add_data_args(p, "random masks only (no label masks)")
    C.add_json_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_counts(args.steps, args.warmup, args.batch)
    C.setup_runtime(args.threads, tune_malloc=False)
    device = resolve_device(args.device)
    masks = {}
    data = "random masks only"
    if not args.synthetic:
        case_dir = C.resolve_case_dir(args.root_path)
        masks["label"] = label_masks(case_dir, args.batch, args.patch)
        data = f"LA labels at {case_dir.parent} and random masks"
    masks.update(synthetic_masks(args.batch, args.patch, args.seed, args.noise))
    payload = {"benchmark": "simulated_clicks", "batch": args.batch, "patch": list(args.patch), "data": data,
               "steps": args.steps, "warmup": args.warmup, "device": str(device),
               "machine": machine_info(device)}
    payload["clicks"] = bench_clicks(masks, device, args.warmup, args.steps, args.seed)
    print(report(payload))
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
