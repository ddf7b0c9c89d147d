"""SemiSAM in one command, on any machine: `make demo` (or, from code/, `python demo.py`; `-h` lists the flags).

SemiSAM trains a V-Net mean teacher (MT) from a few labeled scans plus unlabeled ones and adds a frozen SAM-Med3D
generalist, prompted ONLY with clicks simulated from the V-Net's own prediction; SAM's mask is an extra
pseudo-label loss. The steps, each through the package's own functions (``training.demo_recipe``, which
study_generalist.py runs over several seeds and generalists):

1. data: the real LA data in ``<data_root>`` if present, else synthetic LA-like phantoms written once to
   ``<data_root>/phantoms/`` (make_phantoms.py's generator);
2. generalist (``--generalist auto``): ``<ckpt_dir>/sam_med3d.pth`` if present, else the shipped demo generalist
   ``model/released/demo_generalist.pth`` (``--shipped_generalist``), else a small SAM-Med3D-architecture model
   pretrained here on synthetic shapes (pretrain_generalist.py's recipe; reused or resumed later; ``--generalist
   pretrain`` chooses it);
3. how good that generalist is here: its Dice with 10 clicks from the ground truth of the test cases;
4. train every method of ``METHODS`` (MT, SemiSAM, SemiSAM+) with the same settings through
   ``training.run.main``, the entry point of the train_LA_*.py scripts, on the official 6000-iteration schedule
   compressed to ``--iterations``, and evaluate each with test_LA.py's protocol;
5. print them side by side with the paired per-case differences vs MT; prompt the generalist from each method's
   predictions; say whether each generalist method beat MT beyond noise; write ``<out>/demo.png`` and
   ``summary.{json,md}``.

The numbers depend on the CPU, the thread count and the memory layout (README, "make demo");
``--threads 1 --channels_last 0`` repeats a run exactly on the same CPU. ``--quick`` is a smoke test (seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dataloaders.la_heart import read_list
from dataloaders.layout import repo_default
from training.demo_recipe import (BASELINE, METHODS, SHIPPED_GENERALIST, add_setting_flags, compare_with_baseline,
                                  generalist_branch, prepare_data, prepare_generalist, run_method, schedule,
                                  settings_from, verdict, zero_shot_quality)
from utils.compare import check_generalist
from utils.errors import run_entry
from utils.figures import save_segmentation_figure
from utils.report import demo_markdown, side_by_side, text_table
from utils.runtime import default_threads, loadavg, machine_info, resolve_device

ABOUT = ("SemiSAM trains a V-Net mean teacher (MT) from a few labeled scans and adds a frozen SAM-Med3D generalist, "
         "prompted only with clicks simulated from the V-Net's own prediction on unlabeled patches; SAM's mask is "
         "an extra pseudo-label loss (SemiSAM+: weighted by the agreement of several prompts). MT alone is the "
         "baseline.")
REPRODUCIBILITY = ("These numbers depend on the CPU, the torch thread count and the memory layout, which change the "
                   "summation order (README, 'make demo'); `--threads 1 --channels_last 0` repeats a run exactly on "
                   "the same CPU. Compare methods over several seeds (study_generalist.py), never one demo run.")


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="tiny smoke-test setting (seconds; meaningless numbers)")
    a("--out", default="../model/demo", help="output folder")
    a("--data_root", default="../data", help="folder with the real LA data, or where phantoms are written")
    a("--ckpt_dir", default="../ckpt", help="generalist checkpoints")
    a("--data", choices=("auto", "la", "phantoms"), default="auto", help="auto: the real LA data if present")
    a("--generalist", default="auto", help="auto: <ckpt_dir>/sam_med3d.pth if present, else the shipped demo "
                                           "generalist, else one pretrained here | pretrain: the one pretrained here "
                                           "| the path of a SAM-Med3D checkpoint")
    a("--generalist_arch", default="vit_b_ori", help="architecture of a --generalist path (name or JSON config)")
    a("--shipped_generalist", default=repo_default(SHIPPED_GENERALIST),
      help="the shipped demo generalist that --generalist auto uses (its architecture JSON beside it)")
    a("--skip_pretrain", action="store_true", help="use the pretrained demo generalist as it is, whatever its "
                                                   "settings")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--threads", type=int, default=0, help="torch CPU threads (0: the cores the load average leaves idle)")
    a("--channels_last", choices=("auto", "1", "0"), default="auto", help="training memory layout")
    a("--no_progress", action="store_true", help="no progress bars or lines")
    add_setting_flags(p)   # the preset settings: absent unless given (then DEFAULTS or QUICK)
    return p.parse_args(argv)


def generalist_figure(results: dict, generalist: dict, s: dict, data: dict, out: Path, device: str) -> dict:
    """Step 5: the generalist prompted from each method's predictions of the first test cases (as SemiSAM
    training prompts it) and scored in its crop; demo.png draws the first ``figure_cases`` of them."""
    branch = generalist_branch(generalist, s["num_clicks"], s["seed"], device)
    found = check_generalist(branch, data["root_path"], {n: r["predictions"] for n, r in results.items()},
                             s["patch_size"], device, BASELINE, s["figure_cases"])
    title = (f"{'LA' if data['kind'] == 'LA' else 'synthetic phantoms'}, {s['labeled_num']} labeled, "
             f"{s['iterations']} iterations; SAM = {generalist['kind']} generalist, {s['num_clicks']} clicks from "
             "the specialist's prediction (dashed: SAM's crop; yellow line: ground truth)")
    path = save_segmentation_figure(out / "demo.png", found["figure"], n_slices=s["figure_slices"], title=title)
    drawn = {c.name for c in found["figure"]}
    return dict(path=str(path), check=found["check"], sam_panels=[n for n in found["notes"] if n["case"] in drawn])


def main(argv=None) -> dict:
    """Run the whole demo; returns the summary dict (also written to <out>/summary.json)."""
    args = parse_args(argv)
    s, device, threads_before = settings_from(args), str(resolve_device(args.device)), torch.get_num_threads()
    torch.set_num_threads(default_threads(args.threads))
    try:
        return run_demo(args, s, device)
    finally:
        torch.set_num_threads(threads_before)   # callers in the same process keep their setting


def run_demo(args, s: dict, device: str) -> dict:
    """Steps 1-5 with checked settings ``s``; every step's wall time goes into the summary."""
    out, wall, load_start, m = Path(args.out), {}, loadavg(), machine_info(device)
    progress = not args.no_progress

    def step(label, fn, *fn_args, **fn_kwargs):
        start = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        wall[label] = time.perf_counter() - start
        return result
    say(ABOUT + (" (--quick: smoke-test settings, the numbers mean nothing)" if args.quick else ""))
    flags = ", ".join(m["cpu_flags"]) or "no AVX2 or AVX-512"
    say(f"machine: {m['cpu']} ({flags}), {m['usable_cores']} usable cores, torch {m['torch']} "
        f"with {m['torch_threads']} thread(s) on {device}, load average {load_start}")
    data = step("data", prepare_data, args.data_root, s, choice=args.data, quick=args.quick, progress=progress,
                say=say)
    generalist = step("generalist", prepare_generalist, args.generalist, s, ckpt_dir=args.ckpt_dir,
                      shipped=args.shipped_generalist, arch=args.generalist_arch, quick=args.quick,
                      skip_pretrain=args.skip_pretrain, device=device, progress=progress, say=say)
    cases = read_list(data["test_list"])[:s["max_test_cases"] or None]
    quality = step("generalist quality", zero_shot_quality, generalist, data, cases, s, device)
    say(quality["statement"])
    runs, results = {}, {}
    for name in METHODS:
        runs[name], results[name] = run_method(
            name, s, data, generalist, cases, model_dir=out, device=device, progress=progress, say=say,
            channels_last=None if args.channels_last == "auto" else args.channels_last == "1",
            keep=max(s["sam_check_cases"], s["figure_cases"]))
        wall[f"train {name}"], wall[f"evaluate {name}"] = runs[name]["seconds"], results[name]["seconds"]
    unit = results[BASELINE]["distance_unit"]
    comparisons = compare_with_baseline(results)
    print("\n" + text_table(*side_by_side(results, unit)) + "\n", flush=True)
    print("\n".join(c["statement"] for c in comparisons) + "\n", flush=True)
    figure = step("generalist check and figure", generalist_figure, results, generalist, s, data, out, device)
    say(figure["check"]["statement"])
    final = verdict(quality, figure["check"], comparisons)
    say(final)
    say(f"figure: {figure['path']}")
    say(REPRODUCIBILITY)
    wall["total"] = sum(wall.values())
    summary = dict(about=ABOUT, quick=args.quick, data=data, generalist=generalist, methods=METHODS,
                   settings=dict(s, **schedule(s["iterations"]), device=device, threads=torch.get_num_threads()),
                   distance_unit=unit, n_test_cases=len(cases), training=runs, comparisons=comparisons,
                   generalist_quality=dict(zero_shot=quality, prompted_from_baseline=figure["check"][BASELINE]),
                   verdict=final,
                   results={n: {k: v for k, v in r.items() if k != "predictions"} for n, r in results.items()},
                   table=side_by_side(results, unit), figure=figure, wall_seconds=wall, machine=m,
                   loadavg_start=load_start, loadavg_end=loadavg(), reproducibility=REPRODUCIBILITY)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(demo_markdown(summary))
    say(f"summary: {out / 'summary.json'} and {out / 'summary.md'}; total {wall['total'] / 60:.1f} min")
    return summary


if __name__ == "__main__":
    run_entry(main)   # a ProjectError (RecipeError included): one line `demo.py: error: ...`, exit status 2
