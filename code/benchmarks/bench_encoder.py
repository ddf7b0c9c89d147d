"""SAM-Med3D image encoder, fast vs reference attention, fp32 and bf16; optionally the whole generalist branch.

    python benchmarks/bench_encoder.py                       # vit_b_ori, batch 2, fp32 + bf16
    python benchmarks/bench_encoder.py --branch --root_path ../data --json ../results/encoder.json

Part 1 (always): ``image_encoder`` of a RANDOM-weight generalist (``--arch``, default vit_b_ori; the zero-
initialised position tables are filled with N(0, 0.02^2) so the relative-position terms are not all zero)
on a seeded N(0, 1) input (B, 1, S, S, S). Two attention paths (``networks.sam_med3d.set_attention_impl``):

- ``reference``: the straightforward official computation over every row of each zero-padded window
  (vit_b_ori: a 8^3 token grid padded to one 14^3 window, i.e. 2744 query rows per window, of which 512 are
  real) with an explicit softmax;
- ``fast``: only the real query rows, ``scaled_dot_product_attention`` with the rel-pos terms as a mask.

Every configuration gets ``--warmup`` untimed calls; then ``--steps`` rounds call each configuration once in
turn (interleaved, so a drifting load of a shared machine hits all alike). Reported per precision: median
[min, max] wall-clock time and median CPU time of this process, the speed-up reference/fast, and the max abs
difference between the paths (and relative to the output's max abs value); across precisions: the bf16/fp32
speed-up of each path and the max abs difference bf16 vs fp32.

Part 2 (``--branch``): ``utils.generalist.GeneralistBranch`` (the training's generalist: SAM z-norm, padding
to S^3, encoder once, ``--num_clicks`` iterative clicks with the decoder) fp32 vs bf16 on ``--batch`` real LA
patches (centre crops of the first training cases, ``--patch``), prompted from their ground-truth label as
a stand-in for a perfect specialist. Same click generator seed for both. Reported: time (with encoder /
prompt encoder / decoder / rest), speed-up and the voxel agreement and Dice of the two pseudo-labels. With
random weights the pseudo-labels are meaningless, and their bf16/fp32 agreement is only indicative (trained
weights give other logit margins).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402

from utils.metrics import binary_dice  # noqa: E402
from utils.report import markdown_table  # noqa: E402
from utils.runtime import autocast, loadavg, machine_info, resolve_device  # noqa: E402

IMPLS = ("fast", "reference")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _progress(what: str):
    return lambda name: print(f"  {what} {name} ...", file=sys.stderr, flush=True)


def _speedup(runs: dict, slow: str, fast: str) -> dict:
    """{'wall', 'cpu'}: median time of ``slow`` / median time of ``fast``."""
    return {clock: C.ratio(runs[slow][clock]["median"], runs[fast][clock]["median"]) for clock in ("wall", "cpu")}


def bench_encoder(model, batch: int, precisions: Sequence[str], impls: Sequence[str], device: torch.device,
                  warmup: int, steps: int, seed: int) -> dict:
    """Time ``model.image_encoder`` for every (precision, attention impl), interleaved; compare outputs."""
    from networks.sam_med3d import set_attention_impl
    encoder = model.image_encoder
    size = int(encoder.img_size)
    x = torch.randn((batch, 1, size, size, size), generator=torch.Generator().manual_seed(seed)).to(device)

    def make_call(prec: str, impl: str):
        def call():
            set_attention_impl(encoder, impl)
            with torch.inference_mode(), autocast(device, C.amp_dtype(prec)):
                return encoder(x).float()
        return call

    calls = {f"{prec}/{impl}": make_call(prec, impl) for prec in precisions for impl in impls}
    runs, outputs = C.interleaved(calls, device, warmup, steps, _progress("encoder"))
    set_attention_impl(encoder, "fast")
    result = {"runs": runs, "per_precision": {}, "per_impl": {}}
    for prec in precisions:
        entry = {}
        if len(impls) == 2:
            ref, fast = outputs[f"{prec}/reference"], outputs[f"{prec}/fast"]
            diff = max_abs_diff(fast, ref)
            entry = {"speedup_fast_vs_reference": _speedup(runs, f"{prec}/reference", f"{prec}/fast"),
                     "max_abs_diff_fast_vs_reference": diff,
                     "rel_max_abs_diff_fast_vs_reference": diff / max(float(ref.abs().max()), 1e-30)}
        result["per_precision"][prec] = entry
    if "fp32" in precisions and "bf16" in precisions:
        for impl in impls:
            result["per_impl"][impl] = {
                "speedup_bf16_vs_fp32": _speedup(runs, f"fp32/{impl}", f"bf16/{impl}"),
                "max_abs_diff_bf16_vs_fp32": max_abs_diff(outputs[f"bf16/{impl}"], outputs[f"fp32/{impl}"])}
    return result


def branch_inputs(case_dir: Path, batch: int, patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(images (B, 1, X, Y, Z), labels float (B, X, Y, Z), cases): centre crops of the first training cases."""
    from dataloaders.la_heart import CenterCrop, load_case, read_list
    cases = read_list(case_dir.parent / "train.list")[:batch]
    if len(cases) < batch:
        raise C.BenchmarkError(f"--batch {batch} needs {batch} training cases; {case_dir.parent / 'train.list'} "
                               f"lists {len(cases)}")
    crop = CenterCrop(tuple(patch))
    images, labels = [], []
    for case in cases:
        image, label = load_case(case_dir, case)
        sample = crop({"image": image, "label": label})
        images.append(torch.from_numpy(sample["image"].copy()))
        labels.append(torch.from_numpy(sample["label"].astype("float32")))
    return torch.stack(images).unsqueeze(1), torch.stack(labels), cases


def bench_branch(model, images: torch.Tensor, prob: torch.Tensor, precisions: Sequence[str], prompt: str,
                 num_clicks: int, device: torch.device, warmup: int, steps: int, seed: int) -> dict:
    """Time ``GeneralistBranch`` per precision, interleaved (parts via the branch's timer); compare the
    pseudo-labels."""
    from training.timing import SectionTimer
    from utils.generalist import GeneralistBranch
    images, prob = images.to(device), prob.to(device)
    timer = SectionTimer(synchronize=device.type == "cuda", device=device)
    parts: dict = {prec: [] for prec in precisions}

    def make_call(prec: str):
        def call():
            branch = GeneralistBranch([model], prompt=prompt, num_clicks=num_clicks, geometry="pad",
                                      amp_dtype=C.amp_dtype(prec), generator=torch.Generator().manual_seed(seed),
                                      timer=timer)
            timer.reset()
            out = branch(images, prob)
            parts[prec].append({k: v["total_s"] for k, v in timer.summary().items()})
            return out
        return call

    runs, outputs = C.interleaved({p: make_call(p) for p in precisions}, device, warmup, steps, _progress("branch"))
    for prec in precisions:
        timed_parts = parts[prec][warmup:]
        mean = {k: sum(p[k] for p in timed_parts) / len(timed_parts) for k in timed_parts[0]}
        runs[prec]["mean_parts_s"] = mean
        runs[prec]["foreground_fraction"] = float(outputs[prec][0].mean())
    result = {"runs": runs}
    if "fp32" in outputs and "bf16" in outputs:
        m32, m16 = outputs["fp32"][0].cpu(), outputs["bf16"][0].cpu()
        result.update(speedup_bf16_vs_fp32=_speedup(runs, "fp32", "bf16"),
                      voxel_agreement_bf16_vs_fp32=float((m32 == m16).float().mean()),
                      dice_bf16_vs_fp32=binary_dice(m32, m16))
    return result


def report(payload: dict) -> str:
    enc = payload["encoder"]
    lines = [f"image encoder {payload['arch']} (random weights), batch {payload['batch']}, {payload['warmup']} "
             f"warm-up + {payload['steps']} timed calls each (interleaved), {payload['machine']['torch_threads']} "
             f"threads on {payload['device']}; speed-ups: wall-clock (CPU time)"]
    rows = []
    for prec, entry in enc["per_precision"].items():
        for impl in payload["impls"]:
            run = enc["runs"][f"{prec}/{impl}"]
            row = [f"{prec} {impl}", C.fmt_spread(run["wall"]), C.fmt_seconds(run["cpu"]["median"])]
            if impl == "fast" and entry:
                sp = entry["speedup_fast_vs_reference"]
                row += [f"{C.fmt_ratio(sp['wall'])} ({C.fmt_ratio(sp['cpu'])})",
                        f"{entry['max_abs_diff_fast_vs_reference']:.2e} "
                        f"(rel {entry['rel_max_abs_diff_fast_vs_reference']:.1e})"]
            else:
                row += ["", ""]
            speed = enc["per_impl"].get(impl)
            row.append(f"{C.fmt_ratio(speed['speedup_bf16_vs_fp32']['wall'])} "
                       f"({C.fmt_ratio(speed['speedup_bf16_vs_fp32']['cpu'])})" if speed and prec == "bf16" else "")
            rows.append(row)
    lines.append(markdown_table(["encoder", "wall median [min, max]", "CPU time", "fast vs reference",
                                   "max abs diff fast-ref", "bf16 vs fp32"], rows))
    br = payload.get("branch")
    if br:
        lines.append(f"\ngeneralist branch ({payload['branch_settings']}), pseudo-labels of random weights")
        rows = []
        for prec, run in br["runs"].items():
            parts = run["mean_parts_s"]
            other = run["wall"]["median"] - sum(parts.values())
            rows.append([prec, C.fmt_spread(run["wall"]), C.fmt_seconds(run["cpu"]["median"])]
                        + [C.fmt_seconds(parts.get(k)) for k in (
                            "generalist.encoder", "generalist.prompt_encoder", "generalist.decoder",
                            "generalist.first_click", "generalist.clicks")]
                        + [C.fmt_seconds(other), f"{run['foreground_fraction']:.3f}"])
        lines.append(markdown_table(["branch", "wall median [min, max]", "CPU time", "encoder (mean)",
                                       "prompt enc.", "decoder", "first click", "later clicks", "rest",
                                       "fg fraction"], rows))
        if "speedup_bf16_vs_fp32" in br:
            sp = br["speedup_bf16_vs_fp32"]
            lines.append(f"bf16 vs fp32: speed-up {C.fmt_ratio(sp['wall'])} wall ({C.fmt_ratio(sp['cpu'])} CPU "
                         f"time), voxel agreement {100 * br['voxel_agreement_bf16_vs_fp32']:.3f}%, "
                         f"Dice {br['dice_bf16_vs_fp32']:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--arch", default="vit_b_ori", help="SAM-Med3D registry name or JSON config (default vit_b_ori)")
    p.add_argument("--batch", type=int, default=2, help="volumes per encoder call (default 2)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--skip_reference", action="store_true", help="time only the fast attention path")
    p.add_argument("--steps", type=int, default=3, help="timed calls (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tune_malloc", type=int, choices=[0, 1], default=1,
                   help="1: the training scripts' glibc malloc options (training.run.tune_malloc); 0: glibc defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--branch", action="store_true", help="also time the whole generalist branch fp32 vs bf16")
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80], metavar=("X", "Y", "Z"),
                   help="branch patch size (default 112 112 80)")
    p.add_argument("--prompt", default="point", choices=["point", "mask", "unc"])
    p.add_argument("--num_clicks", type=int, default=10)
    C.add_data_args(p, "phantom volumes for --branch instead of LA data")
    C.add_json_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    C.check_counts(args.steps, args.warmup, args.batch)
    C.setup_runtime(args.threads, bool(args.tune_malloc))
    device = resolve_device(args.device)
    model = C.random_sam(args.arch, args.seed).to(device)
    impls = ("fast",) if args.skip_reference else IMPLS
    payload = {"benchmark": "sam_image_encoder", "arch": args.arch, "weights": "random (seed %d)" % args.seed,
               "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "device": str(device),
               "impls": list(impls), "machine": machine_info(device)}
    payload["encoder"] = bench_encoder(model, args.batch, args.precisions, impls, device, args.warmup, args.steps,
                                       args.seed)
    if args.branch:
        with C.scratch_dir("bench_encoder_") as tmp:
            case_dir, data_desc = C.data_case_dir(args.root_path, args.synthetic, Path(tmp))
            images, labels, cases = branch_inputs(case_dir, args.batch, args.patch)
        payload["branch_settings"] = (f"prompt {args.prompt}, {args.num_clicks} clicks, patch "
                                      f"{'x'.join(map(str, args.patch))}, batch {args.batch}, cases {cases}, "
                                      f"{data_desc}, prompted from the ground-truth label")
        payload["branch"] = bench_branch(model, images, labels, args.precisions, args.prompt, args.num_clicks,
                                         device, args.warmup, args.steps, args.seed)
    payload["loadavg_after"] = loadavg()
    print(report(payload))
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
