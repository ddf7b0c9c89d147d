"""Sliding-window inference of one LA test volume, fp32 vs bf16 autocast, with the agreement of the two.

    python benchmarks/bench_inference.py --root_path ../data                 # random-weight V-Net
    python benchmarks/bench_inference.py --checkpoint ../model/LA/MT/iter_6000.pth --json ../results/inf.json

Runs ``utils.inference.sliding_window_predict`` (the test protocol: patch 112x112x80, stride 18 / 4, windows
averaged as UA-MT) on one case of ``test.list`` (``--case``, default the first) with a V-Net of
``--n_filters`` (default 16). Without ``--checkpoint`` the weights are RANDOM (seeded); their BatchNorm
running statistics are then set from ``--bn_windows`` windows of the volume itself (train-mode forward
passes, no labels), so the output is not degenerate (with the initial statistics every voxel came out
foreground here); its probabilities stay near 0.5, though, so its fp32/bf16 agreement is pessimistic and
meaningless as a segmentation: pass a trained ``--checkpoint`` for that check.

Each precision gets one untimed forward of ``--window_batch`` windows first; then ``--repeats`` whole-volume
runs, alternating the precisions so slow drifts of a shared machine hit both. Reported: median [min, max]
wall-clock seconds and the median CPU time of this process, the mean seconds per volume of each part of
``sliding_window_predict`` (prepare, windows, forward, accumulate, finish), the bf16 speed-up (wall and CPU
time, and of the network forwards alone), the Dice
and voxel agreement between the two label maps, the max abs difference of the foreground scores, and each
map's Dice with the ground truth (meaningful with a trained checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from utils.bf16 import bf16_supported  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.metrics import binary_dice  # noqa: E402
from utils.report import markdown_table  # noqa: E402
from utils.runtime import autocast, loadavg, machine_info, resolve_device  # noqa: E402


# the parts of utils.inference.sliding_window_predict its timer sees, in call order
PARTS = ("prepare", "windows", "forward", "accumulate", "finish")


def random_vnet(n_filters: int, seed: int, image: np.ndarray, patch: Sequence[int], bn_windows: int,
                device: torch.device) -> torch.nn.Module:
    """A seeded random V-Net (batchnorm, no dropout; eval mode) with BatchNorm statistics of ``image``.

    The statistics are the cumulative average (``momentum=None``) over ``bn_windows`` windows of
    ``patch`` placed evenly along the volume's diagonal.
    """
    from networks.vnet import VNet
    torch.manual_seed(seed)
    net = VNet(n_channels=1, n_classes=2, n_filters=n_filters, normalization="batchnorm", has_dropout=False)
    net = net.to(device)
    if bn_windows > 0:
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        net.train()
        padded = [max(s, p) for s, p in zip(image.shape, patch)]
        vol = np.zeros(padded, dtype=np.float32)
        vol[tuple(slice(0, s) for s in image.shape)] = image
        with torch.no_grad():
            for k in range(bn_windows):
                f = k / max(bn_windows - 1, 1)
                start = [int(round(f * (s - p))) for s, p in zip(padded, patch)]
                win = vol[tuple(slice(a, a + p) for a, p in zip(start, patch))]
                net(torch.from_numpy(np.ascontiguousarray(win))[None, None].to(device))
        for m in bns:
            m.momentum = 0.1
    return net.eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    C.add_data_args(p, "an LA-sized phantom volume instead of the LA data")
    p.add_argument("--case", default=None, help="case of test.list (default: the first)")
    p.add_argument("--checkpoint", default=None, help="V-Net checkpoint (iter_N.pth or train_state.pth)")
    p.add_argument("--n_filters", type=int, default=16, help="random V-Net width (default 16)")
    p.add_argument("--bn_windows", type=int, default=4,
                   help="windows setting a random V-Net's BatchNorm statistics (default 4; 0: keep 0/1)")
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80], metavar=("X", "Y", "Z"))
    p.add_argument("--stride_xy", type=int, default=18)
    p.add_argument("--stride_z", type=int, default=4)
    p.add_argument("--window_batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--channels_last", choices=["auto", "1", "0"], default="auto",
                   help="channels_last_3d windows and weights (auto: on for CPU and CUDA)")
    p.add_argument("--repeats", type=int, default=1, help="whole-volume runs per precision (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tune_malloc", type=int, choices=[0, 1], default=1,
                   help="1: the training scripts' glibc malloc options (training.run.tune_malloc); 0: glibc defaults")
    p.add_argument("--seed", type=int, default=0)
    C.add_json_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from dataloaders.la_heart import load_case, read_list
    from training.timing import SectionTimer
    from utils.inference import load_specialist, sliding_window_predict, window_starts

    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise C.BenchmarkError(f"--repeats must be >= 1, got {args.repeats}")
    C.setup_runtime(args.threads, bool(args.tune_malloc))
    device = resolve_device(args.device)
    with C.scratch_dir("bench_inference_") as tmp:
        case_dir, data_desc = C.data_case_dir(args.root_path, args.synthetic, Path(tmp))
        test_list = case_dir.parent / "test.list"
        case = args.case or read_list(test_list)[0]
        image, label = load_case(case_dir, case)
    if args.checkpoint:
        net, vnet_cfg = load_specialist(args.checkpoint, device=device)
        weights = f"checkpoint {args.checkpoint}"
    else:
        net = random_vnet(args.n_filters, args.seed, image, args.patch, args.bn_windows, device)
        vnet_cfg = {"n_filters": args.n_filters}
        weights = f"random (seed {args.seed}; BatchNorm statistics from {args.bn_windows} windows of the volume)"
    padded = [max(s, p) for s, p in zip(image.shape, args.patch)]
    n_windows = int(np.prod([len(window_starts(s, p, st)) for s, p, st in
                             zip(padded, args.patch, (args.stride_xy, args.stride_xy, args.stride_z))]))

    # per precision, the seconds of each part of sliding_window_predict summed over the timed volumes
    timers = {prec: SectionTimer(synchronize=device.type == "cuda", device=device) for prec in args.precisions}

    def predict(prec):
        return sliding_window_predict(net, image, tuple(args.patch), args.stride_xy, args.stride_z, 2,
                                      args.window_batch, C.amp_dtype(prec), device,
                                      channels_last=None if args.channels_last == "auto" else args.channels_last == "1",
                                      timer=timers[prec])

    warm = torch.zeros((args.window_batch, 1, *args.patch), device=device)
    for prec in args.precisions:
        with torch.inference_mode(), autocast(device, C.amp_dtype(prec)):
            net(warm)
    calls = {prec: (lambda prec=prec: predict(prec)) for prec in args.precisions}
    runs, outputs = C.interleaved(calls, device, 0, args.repeats,
                                  lambda name: print(f"  {name}: {n_windows} windows ...", file=sys.stderr, flush=True))
    for prec, run in runs.items():
        run.update(foreground_fraction=float((outputs[prec][0] > 0).mean()),
                   dice_vs_ground_truth=binary_dice(outputs[prec][0] > 0, label > 0),
                   parts_mean_s={name: timers[prec].totals[name] / args.repeats for name in PARTS})
    payload = {"benchmark": "sliding_window_inference", "data": data_desc, "case": case,
               "volume_shape": list(image.shape), "patch": args.patch, "stride_xy": args.stride_xy,
               "stride_z": args.stride_z, "windows": n_windows, "window_batch": args.window_batch,
               "channels_last": args.channels_last,
               "vnet": vnet_cfg, "weights": weights, "device": str(device), "repeats": args.repeats,
               "runs": runs, "machine": machine_info(device),
               # False: bf16 ran the plain autocast path on emulated kernels (utils.bf16), not the fused one
               "native_bf16": bf16_supported(device), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    if "fp32" in outputs and "bf16" in outputs:
        (l32, s32), (l16, s16) = outputs["fp32"], outputs["bf16"]
        payload.update(speedup_bf16_vs_fp32={c: C.ratio(runs["fp32"][c]["median"], runs["bf16"][c]["median"])
                                             for c in ("wall", "cpu")},
                       forward_speedup_bf16_vs_fp32=C.ratio(runs["fp32"]["parts_mean_s"]["forward"],
                                                            runs["bf16"]["parts_mean_s"]["forward"]),
                       dice_bf16_vs_fp32=binary_dice(l32 > 0, l16 > 0),
                       voxel_agreement_bf16_vs_fp32=float((l32 == l16).mean()),
                       max_abs_score_diff=float(np.abs(s32[1] - s16[1]).max()))
    payload["loadavg_after"] = loadavg()

    print(f"sliding-window inference of {case} {tuple(image.shape)} ({data_desc}), patch "
          f"{'x'.join(map(str, args.patch))}, stride {args.stride_xy}/{args.stride_z}, {n_windows} windows in "
          f"batches of {args.window_batch}, V-Net {vnet_cfg}, weights {weights}, "
          f"{payload['machine']['torch_threads']} threads on {device}")
    rows = [[p, C.fmt_spread(r["wall"]), C.fmt_seconds(r["cpu"]["median"]), f"{r['foreground_fraction']:.4f}",
             f"{r['dice_vs_ground_truth']:.4f}"] for p, r in runs.items()]
    print(markdown_table(["precision", "wall median [min, max]", "CPU time", "fg fraction", "Dice vs GT"], rows))
    print("mean time per volume by part of sliding_window_predict:")
    print(markdown_table(["precision", *PARTS],
                           [[p, *(C.fmt_seconds(r["parts_mean_s"][k]) for k in PARTS)] for p, r in runs.items()]))
    if "speedup_bf16_vs_fp32" in payload:
        sp = payload["speedup_bf16_vs_fp32"]
        print(f"bf16 vs fp32: speed-up {C.fmt_ratio(sp['wall'])} wall ({C.fmt_ratio(sp['cpu'])} CPU time), Dice "
              f"between the label maps {payload['dice_bf16_vs_fp32']:.5f}, voxel agreement "
              f"{100 * payload['voxel_agreement_bf16_vs_fp32']:.4f}%, max |score difference| "
              f"{payload['max_abs_score_diff']:.2e}; the network forwards alone "
              f"{C.fmt_ratio(payload['forward_speedup_bf16_vs_fp32'])}")
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
