"""End-to-end check of the training and test scripts on one device (CUDA by default), for a lent GPU machine.

    python benchmarks/gpu_smoke.py --root_path LA_ROOT --json ../results/gpu/smoke.json
    python benchmarks/gpu_smoke.py --synthetic --device cpu --quick      # tiny settings (what the test runs)

The unit tests run on CPU only; this drives the real entry scripts, each in its own process, on the device:

1. ``train_LA_semisam_mt.py`` for N iterations (fp32), writing ``iter_N.pth``;
2. the same run stopped after N/2 iterations (the hidden ``--stop_after``, as a killed run) and continued
   with ``--resume``: its ``iter_N.pth`` is compared with 1's (max |difference| over the state dict; any
   difference is a failure, since the scripts default to ``--deterministic 1``);
3. ``train_LA_semisam_mt.py --amp bf16`` for N iterations;
4. ``train_LA_uamt.py`` for N iterations;
5. with ``--ddp``: ``torchrun --nproc_per_node 1 train_LA_mt.py`` for N iterations (the DistributedDataParallel
   path, one rank);
6. ``train_LA_semisam_plus.py`` (two generalists, ``--prompt unc``) for N iterations with validation at
   iteration N on the last case of the training list, held out of its training list (best_model.pth);
7. ``pretrain_generalist.py`` fine-tuning the generalist checkpoint for N iterations on the training cases
   (gradients through the whole SAM-Med3D);
8. ``test_LA.py`` on the first K test cases with 1's checkpoint, fp32 and ``--amp bf16`` (Dice, Jaccard,
   HD95 and ASD in mm from its summary.json).

On a CPU device without native bfloat16 (``utils.bf16``) the ``--amp bf16`` commands (3 and 8) must refuse
instead, with exit status 2 and one line saying why; that is what is checked there.

Settings are the scripts' own (paper patch sizes, batch 4) with a RANDOM-weight vit_b_ori generalist, so the
numbers say that every path runs and what it costs, not how well it segments. ``--quick`` shrinks the patch,
the V-Net and the generalist (vit_tiny_demo) so the whole check runs on a CPU in about a minute. Each step
records its command, exit status, seconds and, on failure, the end of its output; the exit status is 1 when a
step failed. Data: ``--root_path`` (LA root with train.list and test.list) or ``--synthetic`` phantoms.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common as C
from utils.bf16 import NO_NATIVE_BF16_TEXT, bf16_supported
from utils.runtime import machine_info

CODE_DIR = Path(__file__).resolve().parent.parent
QUICK = dict(patch=["48", "48", "32"], n_filters="4", arch="vit_tiny_demo")


REFUSAL_RC = 2       # the entry scripts' exit status for an error the user can fix


def _run(cmd: Sequence[str], timeout: float, env: Optional[dict] = None, refusal: Optional[str] = None) -> dict:
    """Run one command from code/; {'command', 'rc', 'seconds', 'tail' (on failure)}. With ``refusal`` the
    command must instead refuse to run: exit status 2 and that text in its last output line
    ({'refused_as_expected': bool} is added)."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), cwd=CODE_DIR, capture_output=True, text=True, timeout=timeout,
                              env=env)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    rec = {"command": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if refusal is not None:
        lines = [line for line in out.splitlines() if line.strip()]
        rec["refused_as_expected"] = rc == REFUSAL_RC and bool(lines) and refusal in lines[-1]
        rec["tail"] = out[-3000:]
        print(f"  {'refused as expected' if rec['refused_as_expected'] else 'NOT REFUSED AS EXPECTED'}: "
              f"{lines[-1] if lines else ''}", flush=True)
        return rec
    if rc != 0:
        rec["tail"] = out[-3000:]
        print(f"  FAILED ({rc}):\n{rec['tail']}", flush=True)
    else:
        print(f"  ok in {rec['seconds']} s", flush=True)
    return rec


def _state_max_diff(a: Path, b: Path) -> float:
    """Largest |difference| between two saved V-Net state dicts (same keys)."""
    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    sa, sb = (s.get("model_state_dict", s) for s in (sa, sb))
    if set(sa) != set(sb):
        raise C.BenchmarkError(f"{a} and {b} hold different keys")
    return max(float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0 for k in sa)


def run_smoke(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    case_dir, data_desc = C.data_case_dir(args.root_path, args.synthetic, work)
    arch = QUICK["arch"] if args.quick else "vit_b_ori"
    ckpt = C.random_generalist_checkpoint(work / "generalists", arch, seed=0)
    n, half = args.iterations, max(1, args.iterations // 2)
    model_dir = work / "model"
    base = ["--root_path", str(case_dir), "--model_dir", str(model_dir), "--device", args.device,
            "--max_iterations", str(n), "--save_every", str(n), "--num_workers", str(args.num_workers),
            "--progress", "0", "--image_every", "0"]
    if args.quick:
        base += ["--patch_size", *QUICK["patch"], "--n_filters", QUICK["n_filters"], "--labeled_num", "2"]
    sam = ["--generalist", str(ckpt), "--generalist_arch", arch]
    py = sys.executable
    steps: dict = {}
    # on a CPU without native bfloat16 the scripts must refuse --amp bf16 (utils.bf16): check that instead
    bf16_refusal = None if bf16_supported(args.device) else NO_NATIVE_BF16_TEXT

    def train(name: str, script: str, *extra: str, launcher: Sequence[str] = (py,)) -> bool:
        refusal = bf16_refusal if "bf16" in extra else None
        steps[name] = _run([*launcher, script, *base, "--exp", name, *extra], args.timeout, refusal=refusal)
        return steps[name]["rc"] == 0

    if train("semisam_fp32", "train_LA_semisam_mt.py", *sam):
        steps["semisam_fp32"]["checkpoint"] = str(model_dir / "semisam_fp32" / f"iter_{n}.pth")
    if train("semisam_resumed", "train_LA_semisam_mt.py", *sam, "--stop_after", str(half)):
        steps["semisam_resumed_part2"] = _run([py, "train_LA_semisam_mt.py", *base, "--exp", "semisam_resumed",
                                               *sam, "--resume"], args.timeout)
        a, b = (model_dir / e / f"iter_{n}.pth" for e in ("semisam_fp32", "semisam_resumed"))
        if a.is_file() and b.is_file():
            steps["semisam_resumed_part2"]["max_abs_diff_to_uninterrupted"] = _state_max_diff(a, b)
    train("semisam_bf16", "train_LA_semisam_mt.py", *sam, "--amp", "bf16")
    train("uamt_fp32", "train_LA_uamt.py")
    if args.ddp:
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        train("mt_ddp1", "train_LA_mt.py", launcher=torchrun)
    cases = [c.strip() for c in (case_dir.parent / "train.list").read_text().splitlines() if c.strip()]
    train_list, val_list = work / "train_held_out.list", work / "val.list"
    train_list.write_text("\n".join(cases[:-1]) + "\n")
    val_list.write_text(cases[-1] + "\n")
    ckpt2 = C.random_generalist_checkpoint(work / "generalists", arch, seed=1)
    val_stride = ["--val_stride_xy", "48", "--val_stride_z", "32"] if args.quick else []
    if train("semisam_plus_unc_val", "train_LA_semisam_plus.py", "--generalist", str(ckpt), str(ckpt2),
             "--generalist_arch", arch, "--prompt", "unc", "--train_list", str(train_list), "--val_list",
             str(val_list), "--val_every", str(n), *val_stride):
        best = model_dir / "semisam_plus_unc_val" / "best_model.pth"
        steps["semisam_plus_unc_val"]["best_model_written"] = best.is_file()
    steps["pretrain_finetune"] = _run(
        [py, "pretrain_generalist.py", "--arch", arch, "--init", str(ckpt), "--data", str(case_dir),
         "--data_list", str(train_list), "--iterations", str(n), "--batch_size", "2", "--device", args.device,
         "--workers", "0", "--no_progress", "--out", str(work / "finetuned" / "generalist.pth")], args.timeout)

    metrics: dict = {}
    ckpt_path = model_dir / "semisam_fp32" / f"iter_{n}.pth"
    if ckpt_path.is_file():
        for amp in ("none", "bf16"):
            out = work / f"test_{amp}"
            cmd = [py, "test_LA.py", "--root_path", str(case_dir), "--model_path", str(ckpt_path), "--device",
                   args.device, "--amp", amp, "--max_cases", str(args.test_cases), "--out_dir", str(out),
                   "--no_save_nii"]
            if args.quick:
                cmd += ["--patch_size", *QUICK["patch"]]
            steps[f"test_{amp}"] = _run(cmd, args.timeout, refusal=bf16_refusal if amp == "bf16" else None)
            if (out / "summary.json").is_file():
                summary = json.loads((out / "summary.json").read_text())
                metrics[amp] = {k: summary[k] for k in ("mean", "distance_unit") if k in summary}
    failed = [k for k, v in steps.items() if v.get("refused_as_expected", v["rc"] == 0) is not True]
    if steps.get("semisam_plus_unc_val", {}).get("best_model_written") is False:
        failed.append("semisam_plus_unc_val wrote no best_model.pth")
    if not ckpt_path.is_file():
        failed.append("no fp32 checkpoint to test")
    resume_diff = steps.get("semisam_resumed_part2", {}).get("max_abs_diff_to_uninterrupted")
    if resume_diff is None or resume_diff != 0.0:
        failed.append(f"resumed run vs uninterrupted run: max |difference| {resume_diff} (expected 0.0)")
    return {"machine": machine_info(torch.device(args.device)), "native_bf16": bf16_refusal is None,
            "data": data_desc, "generalist": arch,
            "iterations": n, "quick": args.quick, "steps": steps, "test_metrics": metrics, "failed": failed}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda")
    C.add_data_args(p)
    p.add_argument("--quick", action="store_true", help="tiny patch, V-Net and generalist (CPU-sized)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--test_cases", type=int, default=2)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--ddp", action="store_true", help="also run train_LA_mt.py under torchrun, one rank")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per command")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    C.add_json_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.iterations < 2:
        raise SystemExit("gpu_smoke.py: --iterations must be at least 2 (the resume check stops half-way)")
    tmp = None
    if args.work is None:
        tmp = C.scratch_dir("gpu_smoke_")
        args.work = tmp.name
    try:
        payload = run_smoke(args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    C.write_json(args.json, payload)
    print(json.dumps({k: payload[k] for k in ("failed", "test_metrics")}, indent=1))
    return payload


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
