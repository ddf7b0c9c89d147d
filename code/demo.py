"""SemiSAM in one command, on any machine: `make demo` (or, from code/, `python demo.py`; `-h` lists the flags).

SemiSAM trains a V-Net mean teacher (MT) from a few labeled scans plus unlabeled ones and adds a frozen SAM-Med3D
generalist, prompted ONLY with clicks simulated from the V-Net's own prediction; SAM's mask is an extra
pseudo-label loss. The steps, each through the package's own functions (those the scripts use):

1. data: the real LA data in ``<data_root>`` if present, else synthetic LA-like phantoms written once to
   ``<data_root>/phantoms/`` (make_phantoms.py's generator);
2. generalist: ``<ckpt_dir>/sam_med3d.pth`` if present, else a small SAM-Med3D-architecture model pretrained here
   on synthetic shapes with no atrium-like target (pretrain_generalist.py's recipe; reused or resumed later);
3. train every method of ``METHODS`` with the same settings through ``training.run.main``, the entry point of
   the train_LA_*.py scripts, on the official 6000-iteration schedule compressed to ``--iterations``;
4. evaluate each with test_LA.py's protocol, print them side by side and say whether SemiSAM beat MT;
5. prompt the generalist from each method's predictions; write ``<out>/demo.png`` and ``summary.{json,md}``.

The numbers depend on the CPU, the thread count and the memory layout (README, "make demo");
``--threads 1 --channels_last 0`` repeats a run exactly on the same CPU. ``--quick`` is a smoke test (seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dataloaders.la_heart import read_list
from dataloaders.layout import TRAINING_FOLDER, dataset_paths
from dataloaders.phantoms import ensure_phantom_dataset
from networks.sam_med3d import load_generalist
from training.config import TrainConfig
from training.pretrain import PretrainConfig, config_json_path, ensure_pretrained
from training.run import main as train
from utils.compare import check_generalist, evaluate_checkpoint, paired_comparison
from utils.errors import ConfigError, run_entry
from utils.figures import save_segmentation_figure
from utils.generalist import GeneralistBranch
from utils.report import demo_markdown, side_by_side, text_table
from utils.runtime import default_threads, loadavg, machine_info, resolve_device

# The methods compared, as TrainConfig fields over the settings they share; a method with a generalist term
# also gets the generalist of step 2. SemiSAM+ is one more line:
#     "SemiSAM+": dict(exp="semisam_plus", specialist="mt", generalist_term="semisam_plus", prompt="unc"),
METHODS = {"MT": dict(exp="mt", specialist="mt", generalist_term="none"),
           "SemiSAM": dict(exp="semisam_mt", specialist="mt", generalist_term="semisam", prompt="point")}
BASELINE = "MT"
# sized for a short run on 2 CPU cores (results/demo_cpu.md); --quick only checks that every step connects
DEFAULTS = dict(phantom_size=(96, 96, 64), phantom_train=16, phantom_test=8, phantom_seed=0, labeled_num=2,
                iterations=300, batch_size=4, labeled_bs=2, patch_size=(64, 64, 48), n_filters=8, base_lr=0.01,
                seed=1337, num_clicks=10, sam_weight=0.1, pretrain_iterations=300, pretrain_batch_size=2,
                pretrain_clicks=5, stride_xy=16, stride_z=8, figure_cases=2, figure_slices=3, sam_check_cases=8,
                max_test_cases=0)
QUICK = dict(DEFAULTS, phantom_size=(48, 48, 32), phantom_train=4, phantom_test=2, iterations=3, n_filters=4,
             patch_size=(32, 32, 32), num_clicks=2, pretrain_iterations=2, pretrain_batch_size=1, pretrain_clicks=2,
             stride_z=16, figure_cases=1, figure_slices=2, sam_check_cases=2)
NONNEGATIVE = ("phantom_seed", "seed", "sam_weight", "max_test_cases")
HELP = dict(iterations="training iterations of each method", num_clicks="generalist clicks per unlabeled patch",
            sam_check_cases="test cases on which SAM's pseudo-labels are scored", labeled_num="labeled scans",
            max_test_cases="evaluate only the first N test cases (0: all)")
DEMO_ARCH, PRETRAIN_SEED, LA_SPACING = "vit_tiny_demo", 1337, (0.625, 0.625, 0.625)
CACHE = {False: ("phantoms", "demo_generalist.pth"), True: ("phantoms_quick", "demo_generalist_quick.pth")}
ABOUT = ("SemiSAM trains a V-Net mean teacher (MT) from a few labeled scans and adds a frozen SAM-Med3D generalist, "
         "prompted only with clicks simulated from the V-Net's own prediction on unlabeled patches; SAM's mask is "
         "an extra pseudo-label loss. MT alone is the baseline.")
REPRODUCIBILITY = ("These numbers depend on the CPU, the torch thread count and the memory layout, which change the "
                   "summation order (README, 'make demo'); `--threads 1 --channels_last 0` repeats a run exactly on "
                   "the same CPU. Compare methods over several seeds, never one demo run.")


class DemoError(ConfigError):
    """A demo setting or input that cannot work (the message names the flag or file)."""


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
    a("--generalist", default="auto", help="auto | demo | path of a SAM-Med3D checkpoint")
    a("--generalist_arch", default="vit_b_ori", help="architecture of a --generalist path")
    a("--skip_pretrain", action="store_true", help="use the demo generalist as it is, whatever its settings")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--threads", type=int, default=0, help="torch CPU threads (0: the cores the load average leaves idle)")
    a("--channels_last", choices=("auto", "1", "0"), default="auto", help="training memory layout")
    a("--no_progress", action="store_true", help="no progress bars or lines")
    for key, value in DEFAULTS.items():   # the preset settings: absent unless given (then DEFAULTS or QUICK)
        shape = dict(nargs=3, metavar=("X", "Y", "Z")) if isinstance(value, tuple) else {}
        a(f"--{key}", type=type(value[0] if shape else value), default=argparse.SUPPRESS, **shape,
          help=f"{HELP.get(key, key.replace('_', ' '))} (default {value}; --quick: {QUICK[key]})")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict:
    """The preset (DEFAULTS or QUICK) overridden by the flags given; checked (DemoError names the flag)."""
    s = dict(QUICK if args.quick else DEFAULTS)
    s.update({k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in DEFAULTS})
    for key, value in s.items():
        low = min(value) if isinstance(value, tuple) else value
        if low < 0 or (low == 0 and key not in NONNEGATIVE):
            bound = ">= 0" if key in NONNEGATIVE else ">= 1" if isinstance(low, int) else "> 0"
            raise DemoError(f"--{key} must be {bound}, got {value}")
    if any(p % 16 for p in s["patch_size"]):
        raise DemoError(f"--patch_size {s['patch_size']}: each size must be a multiple of 16 (V-Net)")
    if not s["labeled_bs"] < s["batch_size"]:
        raise DemoError(f"--labeled_bs {s['labeled_bs']} must be < --batch_size {s['batch_size']} (MT and SemiSAM "
                        "need unlabeled patches in every batch)")
    return s


def prepare_data(args, s: dict) -> dict:
    """Step 1: dict(kind, action, spacing, root_path, train_list, test_list)."""
    root = Path(args.data_root)
    la = dataset_paths(root)
    if args.data == "la" and la is None:
        raise DemoError(f"--data la: expected {root / TRAINING_FOLDER}/ with {root / 'train.list'} and "
                        f"{root / 'test.list'} (see data/README.md)")
    if la is not None and args.data != "phantoms":
        say(f"data: the real LA data in {root} (distances in mm, spacing {LA_SPACING})")
        return dict(la, kind="LA", action="found", spacing=list(LA_SPACING))
    out = root / CACHE[args.quick][0]
    action = ensure_phantom_dataset(out, s["phantom_train"], s["phantom_test"], s["phantom_size"],
                                    s["phantom_seed"], progress=not args.no_progress)
    say(f"data: no real LA data in {root}; synthetic LA-like phantoms {action} in {out} ({s['phantom_train']} "
        f"train + {s['phantom_test']} test, {s['phantom_size']} voxels)")
    return dict(dataset_paths(out), kind="phantoms", action=action, spacing=None)


def pretrain_config(s: dict, path: Path, device: str, progress: bool) -> PretrainConfig:
    """pretrain_generalist.py's recipe (PretrainConfig's defaults) at the demo's length, batch and clicks."""
    n = s["pretrain_iterations"]
    return PretrainConfig(out=str(path), arch=DEMO_ARCH, iterations=n, batch_size=s["pretrain_batch_size"],
                          warmup=min(50, max(1, n // 10)), seed=PRETRAIN_SEED, device=device,
                          num_clicks=s["pretrain_clicks"], log_every=max(1, n // 10), save_every=max(1, n // 5),
                          progress=progress)


def prepare_generalist(args, s: dict, device: str, progress: bool) -> dict:
    """Step 2: dict(path, arch, kind, action, ...) of the generalist: given, the official one, or the demo's."""
    official = Path(args.ckpt_dir) / "sam_med3d.pth"
    if args.generalist not in ("auto", "demo"):
        if not Path(args.generalist).is_file():
            raise DemoError(f"--generalist {args.generalist}: checkpoint not found")
        say(f"generalist: {args.generalist} ({args.generalist_arch})")
        return dict(path=args.generalist, arch=args.generalist_arch, kind="given", action="given")
    if args.generalist == "auto" and official.is_file():
        say(f"generalist: the official SAM-Med3D {official}"
            + ("; ViT-B on two 128^3 inputs per step makes SemiSAM slow on a CPU" if device == "cpu" else ""))
        return dict(path=str(official), arch="vit_b_ori", kind="SAM-Med3D", action="found")
    cfg = pretrain_config(s, Path(args.ckpt_dir) / CACHE[args.quick][1], device, progress)
    info = dict(path=cfg.out, arch=str(config_json_path(cfg.out)), kind="demo", pretrain_arch=DEMO_ARCH,
                pretrain_iterations=cfg.iterations)
    if not args.skip_pretrain:
        return dict(info, **ensure_pretrained(cfg, say=lambda m: say(f"generalist: {m}")))
    if not Path(cfg.out).is_file() or not config_json_path(cfg.out).is_file():
        raise DemoError(f"--skip_pretrain: {cfg.out} or {config_json_path(cfg.out)} does not exist; run once "
                        "without --skip_pretrain to train it")
    say(f"generalist: using {cfg.out} as it is (--skip_pretrain)")
    iteration = torch.load(cfg.out, map_location="cpu", weights_only=True).get("iteration")
    return dict(info, action="used as is", pretrain_iterations=iteration)


def schedule(iterations: int) -> dict:
    """The official schedule (lr step 2500, ramp blocks of 150, of 6000 iterations) compressed to ``iterations``."""
    return dict(lr_step=max(1, round(2500 * iterations / 6000)), rampup_block=max(1, round(150 * iterations / 6000)))


def train_config(name: str, s: dict, data: dict, generalist: dict, args, device: str) -> TrainConfig:
    """Step 3: the TrainConfig of method ``name``: every method gets the same data, seed, patches, network and
    schedule; only its ``METHODS`` fields (and the generalist, for a generalist term) differ."""
    fields = dict(root_path=data["root_path"], train_list=data["train_list"], labeled_num=s["labeled_num"],
                  patch_size=s["patch_size"], batch_size=s["batch_size"], labeled_bs=s["labeled_bs"],
                  num_workers=0, cache=data["kind"] == "phantoms", model_dir=args.out, save_every=s["iterations"],
                  image_every=10**9, progress=not args.no_progress, max_iterations=s["iterations"],
                  base_lr=s["base_lr"], seed=s["seed"], n_filters=s["n_filters"], device=device,
                  channels_last=None if args.channels_last == "auto" else args.channels_last == "1",
                  # the demo owns its run folders (a rerun retrains: the old files move to previous_<UTC time>/)
                  # and has chosen the thread count already (training would otherwise choose again from the load)
                  overwrite=True, threads=torch.get_num_threads(),
                  **schedule(s["iterations"]), **METHODS[name])
    if fields["generalist_term"] != "none":
        fields.update(generalist=[generalist["path"]], generalist_arch=generalist["arch"],
                      num_clicks=s["num_clicks"], sam_weight=s["sam_weight"])
    return TrainConfig(**fields).validate()


def generalist_figure(results: dict, generalist: dict, s: dict, data: dict, out: Path, device: str) -> dict:
    """Step 5: the generalist prompted from each method's predictions of the first test cases (as SemiSAM
    training prompts it) and scored in its crop; demo.png draws the first ``figure_cases`` of them."""
    model = load_generalist(generalist["path"], arch=generalist["arch"], device=device)
    branch = GeneralistBranch([model], prompt="point", num_clicks=s["num_clicks"],
                              generator=torch.Generator().manual_seed(s["seed"]))
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

    def step(label, fn, *fn_args, **fn_kwargs):
        start = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        wall[label] = time.perf_counter() - start
        return result
    say(ABOUT + (" (--quick: smoke-test settings, the numbers mean nothing)" if args.quick else ""))
    flags = ", ".join(m["cpu_flags"]) or "no AVX2 or AVX-512"
    say(f"machine: {m['cpu']} ({flags}), {m['usable_cores']} usable cores, torch {m['torch']} "
        f"with {m['torch_threads']} thread(s) on {device}, load average {load_start}")
    data = step("data", prepare_data, args, s)
    generalist = step("generalist", prepare_generalist, args, s, device, not args.no_progress)
    runs, results = {}, {}
    for name in METHODS:
        cfg = train_config(name, s, data, generalist, args, device)
        say(f"training {name} for {cfg.max_iterations} iterations -> {cfg.snapshot_path}")
        # training.run.main(defaults, argv=[]) rebuilds exactly this TrainConfig (no flags to parse) and runs it
        # as the train_LA_*.py scripts do
        trainer = step(f"train {name}", train, dataclasses.asdict(cfg), [])
        last = trainer.last_result.values if trainer.last_result is not None else {}
        runs[name] = dict(checkpoint=str(cfg.snapshot_path / f"iter_{cfg.max_iterations}.pth"),
                          last_losses={k: float(v) for k, v in last.items()})
    cases = read_list(data["test_list"])[:s["max_test_cases"] or None]
    for name in METHODS:
        results[name] = step(f"evaluate {name}", evaluate_checkpoint, runs[name]["checkpoint"], data["root_path"],
                             cases, patch_size=s["patch_size"], stride_xy=s["stride_xy"], stride_z=s["stride_z"],
                             spacing=data["spacing"], device=device, name=f"evaluate {name}",
                             keep=max(s["sam_check_cases"], s["figure_cases"]))
    unit = results[BASELINE]["distance_unit"]
    comparisons = [paired_comparison(results[BASELINE], results[n], BASELINE, n) for n in METHODS if n != BASELINE]
    print("\n" + text_table(*side_by_side(results, unit)) + "\n", flush=True)
    print("\n".join(c["statement"] for c in comparisons) + "\n", flush=True)
    figure = step("generalist check and figure", generalist_figure, results, generalist, s, data, out, device)
    say(figure["check"]["statement"])
    say(f"figure: {figure['path']}")
    say(REPRODUCIBILITY)
    wall["total"] = sum(wall.values())
    summary = dict(about=ABOUT, quick=args.quick, data=data, generalist=generalist, methods=METHODS,
                   settings=dict(s, **schedule(s["iterations"]), device=device, threads=torch.get_num_threads()),
                   distance_unit=unit, n_test_cases=len(cases), training=runs, comparisons=comparisons,
                   results={n: {k: v for k, v in r.items() if k != "predictions"} for n, r in results.items()},
                   table=side_by_side(results, unit), figure=figure, wall_seconds=wall, machine=m,
                   loadavg_start=load_start, loadavg_end=loadavg(), reproducibility=REPRODUCIBILITY)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(demo_markdown(summary))
    say(f"summary: {out / 'summary.json'} and {out / 'summary.md'}; total {wall['total'] / 60:.1f} min")
    return summary


if __name__ == "__main__":
    run_entry(main)   # a ProjectError (DemoError included): one line `demo.py: error: ...`, exit status 2
