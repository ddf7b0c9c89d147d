"""SemiSAM in one command, on any machine: `make demo` (or, from code/, `python demo.py`).

What SemiSAM does: a V-Net "specialist" is trained as a mean teacher (MT) from a few labeled scans plus
unlabeled ones; SemiSAM adds a frozen promptable SAM-Med3D "generalist" that is prompted ONLY with clicks
simulated from the specialist's own prediction on each unlabeled patch, and the generalist's mask becomes an
extra pseudo-label loss for the specialist (weight ramped down over training).

This script, end to end and without downloads:

1. data: the real LA data when ``<data_root>/2018LA_Seg_Training Set`` with ``train.list`` and ``test.list``
   exists; otherwise synthetic LA-like phantoms in the same layout, written once under
   ``<data_root>/phantoms/`` (reused while their settings match);
2. generalist: ``<ckpt_dir>/sam_med3d.pth`` (the official SAM-Med3D, vit_b_ori) when present; otherwise a
   small SAM-Med3D-architecture model pretrained here on a synthetic shape corpus that holds no atrium-like
   target (``<ckpt_dir>/demo_generalist.pth``, trained once and reused while its settings match; an
   interrupted pretraining resumes);
3. trains MT and SemiSAM (MT + SAM term, point prompts) with the same seed and settings, on a short schedule
   that compresses the official 6000-iteration one (learning-rate step and the ramp blocks scale with it);
4. evaluates both with test_LA.py on the test list, prints their metrics side by side and says whether
   SemiSAM beat MT on Dice, whatever happened;
5. writes ``<out>/demo.png`` (axial slices: image, ground truth, MT, SemiSAM, and SAM's pseudo-label when
   prompted from each of them) and ``<out>/summary.json`` / ``summary.md`` (tables, settings, wall times,
   machine).

The defaults below are sized for a short run on 2 free CPU cores (the recorded run and its wall times:
results/demo_cpu.md); flags override them, ``--quick`` is a tiny smoke-test setting. ``python demo.py -h`` lists the flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dataloaders.layout import H5_NAME, TRAINING_FOLDER
from utils.report import markdown_table, text_table
from utils.runtime import default_threads, loadavg, machine_info, resolve_device

# ----------------------------------------------------------------------------------------- settings
DATA_ROOT = "../data"            # real LA: <DATA_ROOT>/2018LA_Seg_Training Set + train.list + test.list
CKPT_DIR = "../ckpt"             # sam_med3d.pth if you have it; demo_generalist.pth is written here
OUT = "../model/demo"            # runs, predictions, demo.png, summary.{json,md}
DATA = "auto"                    # auto (real LA if present) | la | phantoms
GENERALIST = "auto"              # auto (sam_med3d.pth if present) | demo | a checkpoint path
GENERALIST_ARCH = "vit_b_ori"    # architecture of a --generalist path (registry name or JSON config)
DEMO_ARCH = "vit_tiny_demo"      # architecture of the generalist pretrained here
DEVICE = "auto"                  # auto | cpu | cuda | cuda:N
THREADS = 0                      # torch CPU threads; 0: the cores left idle by the current load

PHANTOM_SIZE = (96, 96, 64)      # (X, Y, Z) voxels: the LA anatomy at about half the crop resolution
PHANTOM_TRAIN = 16
PHANTOM_TEST = 8
PHANTOM_SEED = 0
LABELED_NUM = 2
ITERATIONS = 300
BATCH_SIZE = 4
LABELED_BS = 2
PATCH_SIZE = (64, 64, 48)
N_FILTERS = 8
BASE_LR = 0.01
SEED = 1337
NUM_CLICKS = 10
SAM_WEIGHT = 0.1
PRETRAIN_ITERATIONS = 300
PRETRAIN_BATCH_SIZE = 2
PRETRAIN_CLICKS = 5
STRIDE_XY = 16
STRIDE_Z = 8
FIGURE_CASES = 2
FIGURE_SLICES = 3
SAM_CHECK_CASES = 8              # test cases on which SAM's pseudo-labels are compared with the specialist's

OFFICIAL_ITERATIONS = 6000       # the published schedule the short one is scaled from
OFFICIAL_LR_STEP = 2500
OFFICIAL_RAMP_BLOCK = 150

DEFAULTS = dict(
    phantom_size=PHANTOM_SIZE, phantom_train=PHANTOM_TRAIN, phantom_test=PHANTOM_TEST, phantom_seed=PHANTOM_SEED,
    labeled_num=LABELED_NUM, iterations=ITERATIONS, batch_size=BATCH_SIZE, labeled_bs=LABELED_BS,
    patch_size=PATCH_SIZE, n_filters=N_FILTERS, base_lr=BASE_LR, seed=SEED, num_clicks=NUM_CLICKS,
    sam_weight=SAM_WEIGHT, pretrain_iterations=PRETRAIN_ITERATIONS, pretrain_batch_size=PRETRAIN_BATCH_SIZE,
    pretrain_clicks=PRETRAIN_CLICKS, stride_xy=STRIDE_XY, stride_z=STRIDE_Z, figure_cases=FIGURE_CASES,
    figure_slices=FIGURE_SLICES, sam_check_cases=SAM_CHECK_CASES, max_test_cases=None,
)
# --quick: seconds, not minutes; only checks that every stage runs and connects
QUICK = dict(DEFAULTS, phantom_size=(48, 48, 32), phantom_train=4, phantom_test=2, iterations=3,
             patch_size=(32, 32, 32), n_filters=4, num_clicks=2, pretrain_iterations=2, pretrain_batch_size=1,
             pretrain_clicks=2, stride_xy=16, stride_z=16, figure_cases=1, figure_slices=2, sam_check_cases=2)
PHANTOM_DIR = {False: "phantoms", True: "phantoms_quick"}           # kept apart so --quick never
DEMO_GENERALIST = {False: "demo_generalist.pth", True: "demo_generalist_quick.pth"}  # clobbers the real cache
LA_SPACING = (0.625, 0.625, 0.625)
METHODS = (("MT", "mt"), ("SemiSAM", "semisam_mt"))   # (label, experiment folder under <out>)
METRICS = (("dice", "Dice", "%"), ("jaccard", "Jaccard", "%"), ("hd95", "HD95", None), ("asd", "ASD", None))
# pretraining settings a cached demo generalist must share (anything else is not the demo's model)
_PRETRAIN_KEYS = ("arch", "arch_config", "init", "data", "iterations", "batch_size", "lr", "weight_decay",
                  "lr_schedule", "warmup", "clip_grad", "seed", "num_clicks", "no_mask_prob", "fg_prob")


class DemoError(ValueError):
    """A demo setting or input that cannot work (the message names it and what was expected)."""


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="tiny smoke-test setting (seconds; meaningless numbers)")
    a("--out", default=OUT, help="output folder")
    a("--data_root", default=DATA_ROOT, help="folder with the real LA data, or where phantoms are written")
    a("--ckpt_dir", default=CKPT_DIR, help="generalist checkpoints")
    a("--data", choices=("auto", "la", "phantoms"), default=DATA)
    a("--generalist", default=GENERALIST, help="auto | demo | path of a SAM-Med3D checkpoint")
    a("--generalist_arch", default=GENERALIST_ARCH, help="architecture of a --generalist path")
    a("--skip_pretrain", action="store_true",
      help="use the existing demo generalist as it is, even if it was trained with other settings")
    a("--device", default=DEVICE)
    a("--threads", type=int, default=THREADS, help="torch CPU threads (0: idle cores per /proc/loadavg)")
    a("--channels_last", choices=("auto", "1", "0"), default="auto",
      help="training memory layout (auto: channels_last_3d on CPU and CUDA); the maths is the same, the summation order not")
    a("--no_progress", action="store_true", help="no progress bars (default: bars when stderr is a terminal)")
    # the settings below default to the DEFAULTS (or QUICK) presets
    a("--phantom_size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    a("--phantom_train", type=int)
    a("--phantom_test", type=int)
    a("--phantom_seed", type=int)
    a("--labeled_num", type=int)
    a("--iterations", type=int, help="training iterations of each method")
    a("--batch_size", type=int)
    a("--labeled_bs", type=int)
    a("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    a("--n_filters", type=int)
    a("--base_lr", type=float)
    a("--seed", type=int)
    a("--num_clicks", type=int, help="SemiSAM clicks per unlabeled patch")
    a("--sam_weight", type=float)
    a("--pretrain_iterations", type=int)
    a("--pretrain_batch_size", type=int)
    a("--pretrain_clicks", type=int)
    a("--stride_xy", type=int)
    a("--stride_z", type=int)
    a("--figure_cases", type=int)
    a("--figure_slices", type=int)
    a("--sam_check_cases", type=int, help="test cases on which SAM's pseudo-labels are scored")
    a("--max_test_cases", type=int, help="evaluate only the first N test cases")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict:
    """The preset (DEFAULTS or QUICK) overridden by the flags that were given; validated."""
    s = dict(QUICK if args.quick else DEFAULTS)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = tuple(value) if isinstance(value, list) else value
    positive = ("phantom_train", "phantom_test", "labeled_num", "iterations", "batch_size", "labeled_bs",
                "n_filters", "num_clicks", "pretrain_iterations", "pretrain_batch_size", "pretrain_clicks",
                "stride_xy", "stride_z", "figure_cases", "figure_slices", "sam_check_cases")
    for key in positive:
        if s[key] < 1:
            raise DemoError(f"--{key} must be >= 1, got {s[key]}")
    if s["max_test_cases"] is not None and s["max_test_cases"] < 1:
        raise DemoError(f"--max_test_cases must be >= 1, got {s['max_test_cases']}")
    if any(p < 16 or p % 16 for p in s["patch_size"]):
        raise DemoError(f"--patch_size {s['patch_size']}: each size must be a multiple of 16 (V-Net)")
    if not s["labeled_bs"] < s["batch_size"]:
        raise DemoError(f"--labeled_bs {s['labeled_bs']} must be < --batch_size {s['batch_size']} "
                        "(MT and SemiSAM need unlabeled patches in every batch)")
    return s


def choose_threads(requested: int) -> int:
    """``requested``, or (0) the cores left idle by the current load (``utils.runtime.default_threads``, the
    rule every script's ``--threads 0`` follows)."""
    return requested if requested > 0 else default_threads()


# ----------------------------------------------------------------------------------------- 1. data
def _phantom_manifest(s: dict) -> dict:
    return {"generator": "dataloaders.phantoms", "size": list(s["phantom_size"]), "n_train": s["phantom_train"],
            "n_test": s["phantom_test"], "seed": s["phantom_seed"]}


def prepare_data(args, s: dict) -> dict:
    """Find the real LA data or write / reuse the phantoms. Returns dict(kind, root_path, train_list,
    test_list, action, spacing, seconds)."""
    start = time.perf_counter()
    data_root = Path(args.data_root)
    la = data_root / TRAINING_FOLDER
    has_la = la.is_dir() and (data_root / "train.list").is_file() and (data_root / "test.list").is_file()
    if args.data == "la" and not has_la:
        raise DemoError(f"--data la: expected {la}/ with {data_root / 'train.list'} and "
                        f"{data_root / 'test.list'} (see data/README.md)")
    if has_la and args.data != "phantoms":
        say(f"data: the real LA data in {data_root} (distances in mm, spacing {LA_SPACING})")
        return dict(kind="LA", root_path=str(la), train_list=str(data_root / "train.list"),
                    test_list=str(data_root / "test.list"), action="found", spacing=list(LA_SPACING),
                    seconds=time.perf_counter() - start)

    from dataloaders.phantoms import case_name, write_phantom_dataset
    out = data_root / PHANTOM_DIR[args.quick]
    manifest_path = out / "demo_phantoms.json"
    manifest = _phantom_manifest(s)
    n_cases = s["phantom_train"] + s["phantom_test"]
    complete = all((out / TRAINING_FOLDER / case_name(i) / H5_NAME).is_file() for i in range(n_cases))
    cached = (manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest and complete
              and (out / "train.list").is_file() and (out / "test.list").is_file())
    if cached:
        action = "reused"
        say(f"data: no real LA data in {data_root}; reusing the synthetic phantoms in {out} "
            f"({s['phantom_train']} train + {s['phantom_test']} test, {tuple(s['phantom_size'])} voxels)")
    else:
        action = "written"
        say(f"data: no real LA data in {data_root}; writing synthetic LA-like phantoms to {out} "
            f"({s['phantom_train']} train + {s['phantom_test']} test, {tuple(s['phantom_size'])} voxels)")
        manifest_path.unlink(missing_ok=True)   # a crash below must not leave a manifest of other files
        write_phantom_dataset(out, s["phantom_train"], s["phantom_test"], tuple(s["phantom_size"]),
                              s["phantom_seed"])
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return dict(kind="phantoms", root_path=str(out / TRAINING_FOLDER), train_list=str(out / "train.list"),
                test_list=str(out / "test.list"), action=action, spacing=None,
                seconds=time.perf_counter() - start, phantoms=manifest)


# ----------------------------------------------------------------------------------------- 2. generalist
def _pretrain_config(s: dict, path: Path, device: str, progress: bool):
    """The demo's PretrainConfig: pretrain_generalist.py's recipe with the demo's length and batch."""
    import pretrain_generalist as P
    from training.pretrain import PretrainConfig
    iterations = s["pretrain_iterations"]
    return PretrainConfig(
        out=str(path), arch=DEMO_ARCH, iterations=iterations, batch_size=s["pretrain_batch_size"], lr=P.LR,
        weight_decay=P.WEIGHT_DECAY, lr_schedule=P.LR_SCHEDULE, warmup=min(P.WARMUP, max(1, iterations // 10)),
        clip_grad=P.CLIP_GRAD, seed=P.SEED, device=device, num_clicks=s["pretrain_clicks"],
        no_mask_prob=P.NO_MASK_PROB, fg_prob=P.FG_PROB, workers=0, log_every=max(1, iterations // 10),
        save_every=max(1, iterations // 5), progress=progress)


def cached_generalist_status(path: Path, cfg) -> tuple[str, str]:
    """('done' | 'partial' | 'mismatch' | 'missing', reason) for the demo generalist at ``path`` against the
    PretrainConfig ``cfg``: done = a finished run with the same settings and architecture config file."""
    from training.pretrain import CKPT_FORMAT, config_json_path, resolve_arch
    if not path.is_file():
        return "missing", f"{path} does not exist"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is simply not our cache
        return "mismatch", f"{path} cannot be read ({type(err).__name__}: {err})"
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        return "mismatch", f"{path} is not a {CKPT_FORMAT!r} checkpoint"
    saved = ckpt.get("train_args", {})
    diff = [f"{k} {saved.get(k)!r} (want {getattr(cfg, k)!r})" for k in _PRETRAIN_KEYS if saved.get(k) != getattr(cfg, k)]
    if ckpt.get("config") != resolve_arch(cfg.arch):
        diff.append(f"architecture config differs from {cfg.arch!r}")
    if diff:
        return "mismatch", f"{path} was trained with " + ", ".join(diff)
    json_path = config_json_path(path)
    if not json_path.is_file() or json.loads(json_path.read_text()) != ckpt["config"]:
        return "mismatch", f"{json_path} is missing or differs from the checkpoint's architecture"
    if int(ckpt.get("iteration", -1)) < cfg.iterations:
        return "partial", f"{path} stopped at iteration {ckpt.get('iteration')} of {cfg.iterations}"
    return "done", f"{path} holds a finished run with the demo's settings"


def prepare_generalist(args, s: dict, device: str, progress: bool) -> dict:
    """Pick, train or reuse the generalist. Returns dict(path, arch, kind, action, seconds, ...)."""
    start = time.perf_counter()
    ckpt_dir = Path(args.ckpt_dir)
    official = ckpt_dir / "sam_med3d.pth"
    if args.generalist not in ("auto", "demo"):
        path = Path(args.generalist)
        if not path.is_file():
            raise DemoError(f"--generalist {path}: checkpoint not found")
        say(f"generalist: {path} ({args.generalist_arch})")
        return dict(path=str(path), arch=args.generalist_arch, kind="given", action="given",
                    seconds=time.perf_counter() - start)
    if args.generalist == "auto" and official.is_file():
        say(f"generalist: the official SAM-Med3D {official} (vit_b_ori)"
            + ("; on a CPU each SemiSAM step runs ViT-B on two 128^3 inputs, so expect a long run"
               if device == "cpu" else ""))
        return dict(path=str(official), arch="vit_b_ori", kind="SAM-Med3D", action="found",
                    seconds=time.perf_counter() - start)

    from training.pretrain import config_json_path, pretrain
    path = ckpt_dir / DEMO_GENERALIST[args.quick]
    cfg = _pretrain_config(s, path, device, progress)
    status, reason = cached_generalist_status(path, cfg)
    info = dict(path=str(path), arch=str(config_json_path(path)), kind="demo", pretrain_iterations=cfg.iterations,
                pretrain_arch=DEMO_ARCH)
    if args.skip_pretrain:
        if status == "missing":
            raise DemoError(f"--skip_pretrain: {reason}; run without --skip_pretrain once to train it")
        if not config_json_path(path).is_file():
            raise DemoError(f"--skip_pretrain: {config_json_path(path)} (the architecture of {path}) is missing")
        say(f"generalist: using {path} as it is (--skip_pretrain; {reason})")
        iteration = torch.load(path, map_location="cpu", weights_only=True).get("iteration")
        return dict(info, action="used as is", pretrain_iterations=iteration, seconds=time.perf_counter() - start)
    if status == "done":
        say(f"generalist: reusing {path} ({DEMO_ARCH}, {cfg.iterations} pretraining iterations; no retraining)")
        return dict(info, action="reused", seconds=time.perf_counter() - start)
    if status == "partial":
        cfg.resume = str(path)
        say(f"generalist: {reason}; resuming the pretraining")
    else:
        if status == "mismatch":
            say(f"generalist: {reason}; retraining it with the demo's settings")
        say(f"generalist: no official SAM-Med3D in {ckpt_dir}; pretraining a small SAM-Med3D-architecture "
            f"model ({DEMO_ARCH}) for {cfg.iterations} iterations on synthetic shapes (no atrium-like target) "
            f"-> {path}")
    logger = logging.getLogger("pretrain")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[demo]   pretrain: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = pretrain(cfg)
    finally:
        logger.removeHandler(handler)
    tail = result["losses"][-max(1, len(result["losses"]) // 10):]
    dice_tail = result["dice"][-max(1, len(result["dice"]) // 10):]
    return dict(info, action="resumed" if cfg.resume else "trained", seconds=time.perf_counter() - start,
                final_loss=float(np.mean(tail)), final_click_dice=float(np.mean(dice_tail)) if dice_tail else None)


# ----------------------------------------------------------------------------------------- 3. training
def schedule(iterations: int) -> dict:
    """The official schedule compressed to ``iterations``: the lr drops at the same fraction of training
    (2500/6000) and the consistency ramp-up / SAM ramp-down span their 40 blocks over the same fraction
    (40 x 150 = 6000 iterations, i.e. all of it)."""
    scale = iterations / OFFICIAL_ITERATIONS
    return dict(lr_step=max(1, round(OFFICIAL_LR_STEP * scale)),
                rampup_block=max(1, round(OFFICIAL_RAMP_BLOCK * scale)))


def train_settings(s: dict, data: dict, out: Path, device: str, progress: bool) -> dict:
    """TrainConfig fields shared by both methods (the same seed, data, patches, schedule and network)."""
    return dict(root_path=data["root_path"], train_list=data["train_list"], labeled_num=s["labeled_num"],
                patch_size=tuple(s["patch_size"]), batch_size=s["batch_size"], labeled_bs=s["labeled_bs"],
                num_workers=0, cache=data["kind"] == "phantoms", model_dir=str(out), save_every=s["iterations"],
                image_every=10 ** 9, log_every=1, progress=progress, max_iterations=s["iterations"],
                base_lr=s["base_lr"], seed=s["seed"], n_filters=s["n_filters"], device=device,
                # the demo owns its run folders (a rerun retrains: the old files move to previous_<time>/) and
                # has chosen the thread count already (training would otherwise choose again from the load)
                overwrite=True, threads=torch.get_num_threads(),
                **schedule(s["iterations"]))


def train_method(label: str, exp: str, s: dict, common: dict, generalist: dict) -> dict:
    """Train one method through the training engine (the entry script's SETTINGS, overridden by ``common``)."""
    import train_LA_mt
    import train_LA_semisam_mt
    from training.run import main as train_main
    if label == "MT":
        settings = dict(train_LA_mt.SETTINGS, **common, exp=exp)
    else:
        settings = dict(train_LA_semisam_mt.SETTINGS, **common, exp=exp, generalist=[generalist["path"]],
                        generalist_arch=generalist["arch"], prompt="point", num_clicks=s["num_clicks"],
                        sam_weight=s["sam_weight"])
    say(f"training {label} for {s['iterations']} iterations -> {Path(common['model_dir']) / exp}")
    start = time.perf_counter()
    trainer = train_main(settings, argv=[])
    seconds = time.perf_counter() - start
    ckpt = Path(common["model_dir"]) / exp / f"iter_{s['iterations']}.pth"
    if not ckpt.is_file():
        raise DemoError(f"training {label} finished but {ckpt} was not written")
    last = trainer.last_result.values if trainer.last_result is not None else {}
    say(f"{label}: {s['iterations']} iterations in {seconds:.0f} s ({seconds / s['iterations']:.2f} s/iteration)")
    return dict(checkpoint=str(ckpt), seconds=seconds, last_losses={k: float(v) for k, v in last.items()})


# ----------------------------------------------------------------------------------------- 4. evaluation
def evaluate_method(label: str, run: dict, s: dict, data: dict, out_dir: Path, device: str) -> dict:
    import test_LA
    argv = ["--root_path", data["root_path"], "--test_list", data["test_list"], "--model_path", run["checkpoint"],
            "--patch_size", *map(str, s["patch_size"]), "--stride_xy", str(s["stride_xy"]),
            "--stride_z", str(s["stride_z"]), "--out_dir", str(out_dir), "--device", device,
            "--spacing", *(map(str, data["spacing"]) if data["spacing"] else ["0"])]
    if s["max_test_cases"]:
        argv += ["--max_cases", str(s["max_test_cases"])]
    say(f"evaluating {label} with test_LA.py on {data['test_list']}")
    start = time.perf_counter()
    summary = test_LA.main(argv)
    summary["seconds"] = time.perf_counter() - start
    summary["prediction_dir"] = str(out_dir)
    return summary


def _cell(summary: dict, key: str, unit) -> str:
    scale = 100.0 if unit == "%" else 1.0
    return f"{scale * summary['mean'][key]:.2f} ± {scale * summary['std'][key]:.2f}"


def side_by_side(results: dict, unit: str) -> list[list[str]]:
    """Rows [metric, MT cell, SemiSAM cell] with 'mean ± std' cells (Dice / Jaccard in %)."""
    rows = [["metric"] + [label for label, _ in METHODS]]
    for key, name, u in METRICS:
        rows.append([f"{name} ({u or unit})"] + [_cell(results[label], key, u) for label, _ in METHODS])
    return rows


def compare(mt: dict, semisam: dict) -> dict:
    """Paired comparison of the two methods' per-case Dice on the same test cases, in words and numbers."""
    a = {r["case"]: r["dice"] for r in mt["cases"]}
    b = {r["case"]: r["dice"] for r in semisam["cases"]}
    if a.keys() != b.keys():
        raise DemoError(f"MT and SemiSAM were evaluated on different cases: {sorted(a)} vs {sorted(b)}")
    cases = sorted(a)
    diff = np.array([100 * (b[c] - a[c]) for c in cases])
    mean_diff = 100 * (semisam["mean"]["dice"] - mt["mean"]["dice"])
    n = len(cases)
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    beat = mean_diff > 0
    verb = "beat" if beat else ("tied with" if mean_diff == 0 else "did not beat")
    text = (f"SemiSAM {verb} MT on Dice: {100 * semisam['mean']['dice']:.2f} % vs {100 * mt['mean']['dice']:.2f} % "
            f"({mean_diff:+.2f} points; SemiSAM higher on {wins} and lower on {losses} of {n} test cases).")
    if n > 1 and abs(mean_diff) <= 2 * se:
        text += (f" The difference is within two standard errors of the paired per-case differences "
                 f"({mean_diff:+.2f} ± {2 * se:.2f} points), so this run does not show a real difference.")
    elif n > 1:
        text += (f" The difference exceeds two standard errors of the paired per-case differences "
                 f"(± {2 * se:.2f} points) on these {n} cases.")
    text += " One seed, one short schedule: a demonstration, not a benchmark."
    return dict(semisam_beat_mt=bool(beat), dice_difference_points=float(mean_diff), per_case_sd_points=sd,
                standard_error_points=se, semisam_higher_cases=wins, semisam_lower_cases=losses, n_cases=n,
                statement=text)


# ----------------------------------------------------------------------------------------- 5. figure
def _load_nii(path: Path) -> np.ndarray:
    import nibabel as nib
    if not path.is_file():
        raise DemoError(f"{path} not found (test_LA.py writes it unless --no_save_nii)")
    return np.asarray(nib.load(str(path)).dataobj)


def crop_box(mask: np.ndarray, size) -> tuple:
    """A box of ``size`` (clipped to the volume) centred on ``mask``'s bounding box (the volume centre when
    the mask is empty), shifted inside the volume; ((x0, x1), (y0, y1), (z0, z1)) half-open."""
    shape = mask.shape
    size = [min(int(s), n) for s, n in zip(size, shape)]
    fg = np.argwhere(mask > 0)
    centre = (fg.min(0) + fg.max(0)) / 2 if len(fg) else (np.array(shape) - 1) / 2
    box = []
    for c, s, n in zip(centre, size, shape):
        lo = int(min(max(round(c - s / 2), 0), n - s))
        box.append((lo, lo + s))
    return tuple(box)


def sam_pseudo_label(branch, image: np.ndarray, prediction: np.ndarray, size, device: str):
    """SAM's pseudo-label for the crop of ``size`` around ``prediction``, prompted from the prediction only
    (as in SemiSAM training). Returns (mask uint8 (X, Y, Z), zero outside the crop, box)."""
    box = crop_box(prediction, size)
    sl = tuple(slice(a, b) for a, b in box)
    img = torch.from_numpy(np.ascontiguousarray(image[sl], dtype=np.float32))[None, None].to(device)
    prob = torch.from_numpy(np.ascontiguousarray(prediction[sl] > 0, dtype=np.float32))[None].to(device)
    mask, _ = branch(img, prob)
    full = np.zeros(image.shape, np.uint8)
    full[sl] = mask[0].cpu().numpy().astype(np.uint8)
    return full, box


def _case_arrays(results: dict, case: str):
    """(image float32, ground truth, {method: prediction}) of a test case, from test_LA.py's NIfTI files."""
    pred_dirs = {label: Path(results[label]["prediction_dir"]) for label, _ in METHODS}
    image = _load_nii(pred_dirs["MT"] / f"{case}_img.nii.gz").astype(np.float32)
    gt = _load_nii(pred_dirs["MT"] / f"{case}_gt.nii.gz")
    return image, gt, {label: _load_nii(d / f"{case}_pred.nii.gz") for label, d in pred_dirs.items()}


def generalist_stage(results: dict, generalist: dict, s: dict, data: dict, path: Path, device: str) -> dict:
    """Prompt the generalist from each method's test predictions (as SemiSAM training prompts it) and

    - check it: on the first ``sam_check_cases`` test cases, SAM's Dice inside its crop against the prompting
      prediction's Dice there (SemiSAM can only gain where SAM knows something the specialist does not);
    - draw demo.png: for the first ``figure_cases`` of them, image / GT / MT / SemiSAM / SAM <- each method.

    Returns dict(path, sam_panels, check).
    """
    from networks.sam_med3d import load_generalist
    from utils.figures import FigureCase, FigurePanel, save_segmentation_figure
    from utils.generalist import GeneralistBranch
    from utils.metrics import binary_dice
    model = load_generalist(generalist["path"], arch=generalist["arch"], device=device)
    branch = GeneralistBranch([model], prompt="point", num_clicks=s["num_clicks"], geometry="pad",
                              generator=torch.Generator().manual_seed(s["seed"]))
    cases = [r["case"] for r in results["MT"]["cases"]][:max(s["sam_check_cases"], s["figure_cases"])]
    figure_cases, notes = [], []
    for i, case in enumerate(cases):
        image, gt, preds = _case_arrays(results, case)
        panels = [FigurePanel(f"{label}  Dice {binary_dice(p, gt):.2f}", p) for label, p in preds.items()]
        for label, pred in preds.items():
            sam, box = sam_pseudo_label(branch, image, pred, s["patch_size"], device)
            sl = tuple(slice(a, b) for a, b in box)
            d_sam, d_pred = binary_dice(sam[sl], gt[sl]), binary_dice(pred[sl], gt[sl])
            panels.append(FigurePanel(f"SAM \u2190 {label} clicks\ncrop Dice {d_sam:.2f} ({label} {d_pred:.2f})",
                                      sam, box))
            notes.append(dict(case=case, prompted_by=label, crop=[list(b) for b in box], sam_dice_in_crop=d_sam,
                              prompt_dice_in_crop=d_pred, in_figure=i < s["figure_cases"]))
        if i < s["figure_cases"]:
            figure_cases.append(FigureCase(case, image, gt, panels))
    title = (f"{'LA' if data['kind'] == 'LA' else 'synthetic phantoms'}, {s['labeled_num']} labeled, "
             f"{s['iterations']} iterations; SAM = {generalist['kind']} generalist, {s['num_clicks']} clicks "
             f"from the specialist's prediction (dashed: SAM's crop; yellow line: ground truth)")
    save_segmentation_figure(path, figure_cases, n_slices=s["figure_slices"], title=title)
    return dict(path=str(path), sam_panels=[n for n in notes if n["in_figure"]], check=sam_check(notes))


def sam_check(notes: list[dict]) -> dict:
    """Mean Dice (%) of SAM inside its crop vs the prompting prediction's, per method, and a sentence."""
    check = {}
    for label, _ in METHODS:
        rows = [n for n in notes if n["prompted_by"] == label]
        check[label] = dict(n_cases=len(rows), sam_dice=100 * float(np.mean([r["sam_dice_in_crop"] for r in rows])),
                            prompt_dice=100 * float(np.mean([r["prompt_dice_in_crop"] for r in rows])))
    mt = check["MT"]
    better = mt["sam_dice"] > mt["prompt_dice"]
    check["statement"] = (
        f"Generalist check on {mt['n_cases']} test case(s): prompted with clicks from MT's prediction, SAM reaches "
        f"Dice {mt['sam_dice']:.1f} % inside its crop, MT's prediction itself {mt['prompt_dice']:.1f} %; "
        + ("SAM adds information the specialist lacks, which is what the SemiSAM term feeds back."
           if better else
           "SAM's pseudo-labels are worse than the specialist's own prediction, so the SemiSAM term is unlikely "
           "to help here (SemiSAM assumes a generalist that knows more than the specialist, e.g. the official "
           "SAM-Med3D in ckpt/sam_med3d.pth)."))
    return check


# ----------------------------------------------------------------------------------------- 6. summary
def _markdown(rows: list[list[str]]) -> str:
    """``rows[0]`` is the header."""
    return markdown_table(rows[0], rows[1:])


def write_markdown(path: Path, summary: dict) -> None:
    r, unit = summary["results"], summary["distance_unit"]
    by_case = {label: {c["case"]: c for c in r[label]["cases"]} for label, _ in METHODS}
    per_case = [["case"] + [f"{label} {name} ({'%' if u else unit})" for key, name, u in METRICS[:3:2]
                            for label, _ in METHODS]]
    for case in by_case["MT"]:
        per_case.append([case] + [f"{(100 if u else 1) * by_case[label][case][key]:.2f}"
                                  for key, name, u in METRICS[:3:2] for label, _ in METHODS])
    settings = [["setting", "value"]] + [[k, json.dumps(v)] for k, v in summary["settings"].items()]
    times = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in summary["wall_seconds"].items()]
    m, d, g = summary["machine"], summary["data"], summary["generalist"]
    gen = f"**{g['kind']}** `{g['path']}` ({g['action']}"
    if g.get("pretrain_iterations"):
        gen += f", {g['pretrain_arch']} pretrained for {g['pretrain_iterations']} iterations on synthetic shapes"
    gen += ")"
    text = f"""# SemiSAM demo{' (--quick: smoke-test settings, the numbers mean nothing)' if summary['quick'] else ''}

{summary['about']}

Data: **{d['kind']}** ({d['action']}; `{d['root_path']}`). Generalist: {gen}.
Metrics: test_LA.py on {summary['n_test_cases']} test cases, last checkpoint, largest-connected-component
post-processing; mean ± std (population) over cases; distances in **{unit}**.

{_markdown(summary['table'])}

**{summary['comparison']['statement']}**

{summary['figure']['check']['statement']}

{_markdown(per_case)}

Figure: `{Path(summary['figure']['path']).name}` (image, ground truth, MT, SemiSAM, and SAM's pseudo-label when
prompted with clicks from each prediction).

## Settings

The training schedule is the official one compressed to `iterations` (`lr_step`, `rampup_block`).

{_markdown(settings)}

## Wall times

{_markdown(times)}

## Machine

{m['platform']}; {m['cpu']}; {m['cpu_count']} CPUs ({m['usable_cores']} usable); torch {m['torch']} with
{m['torch_threads']} thread(s) on {m['device']}; load average (1, 5, 15 min) at start {summary['loadavg_start']},
at end {summary['loadavg_end']}; {summary['date']}.
"""
    path.write_text(text)


# ----------------------------------------------------------------------------------------- main
ABOUT = ("SemiSAM trains a V-Net mean teacher (MT) from a few labeled scans and adds a frozen SAM-Med3D "
         "generalist, prompted only with clicks simulated from the V-Net's own prediction on unlabeled patches; "
         "SAM's mask is an extra pseudo-label loss. MT alone is the baseline.")


def main(argv=None) -> dict:
    """Run the whole demo; returns the summary dict (also written to <out>/summary.json)."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    s = settings_from(args)
    device = str(resolve_device(args.device))
    threads = choose_threads(args.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_demo(args, s, device, threads, t0)
    finally:
        torch.set_num_threads(previous_threads)   # callers in the same process keep their setting


def run_demo(args, s: dict, device: str, threads: int, t0: float) -> dict:
    """The stages of :func:`main` with parsed arguments, settings ``s``, the device and thread count."""
    progress = not args.no_progress and sys.stderr.isatty()
    loadavg_start = loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(ABOUT)
    say(f"device {device}, {threads} torch thread(s), load average {loadavg_start}"
        + (" (--quick: tiny smoke-test settings, numbers mean nothing)" if args.quick else ""))

    data = prepare_data(args, s)
    generalist = prepare_generalist(args, s, device, progress)
    common = train_settings(s, data, out, device, progress)
    common["channels_last"] = None if args.channels_last == "auto" else args.channels_last == "1"
    runs, results = {}, {}
    for label, exp in METHODS:
        runs[label] = train_method(label, exp, s, common, generalist)
    for label, exp in METHODS:
        results[label] = evaluate_method(label, runs[label], s, data, out / exp / "prediction", device)
    unit = results["MT"]["distance_unit"]
    comparison = compare(results["MT"], results["SemiSAM"])
    rows = side_by_side(results, unit)
    print("\n" + text_table(rows[0], rows[1:]), flush=True)
    print(f"\n{comparison['statement']}\n", flush=True)

    t_fig = time.perf_counter()
    figure = generalist_stage(results, generalist, s, data, out / "demo.png", device)
    say(figure["check"]["statement"])
    say(f"figure: {figure['path']}")
    wall = {"data": data["seconds"], "generalist": generalist["seconds"]}
    wall.update({f"train {label}": runs[label]["seconds"] for label, _ in METHODS})
    wall.update({f"evaluate {label}": results[label]["seconds"] for label, _ in METHODS})
    wall["generalist check and figure"] = time.perf_counter() - t_fig
    wall["total"] = time.perf_counter() - t0
    summary = dict(
        about=ABOUT, quick=args.quick, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), data=data,
        generalist=generalist, settings=dict(s, **schedule(s["iterations"]), device=device, threads=threads),
        distance_unit=unit, n_test_cases=comparison["n_cases"],
        results={label: {k: results[label][k] for k in ("mean", "std", "cases", "checkpoint", "prediction_dir",
                                                        "distance_unit", "spacing")}
                 for label, _ in METHODS},
        training={label: runs[label] for label, _ in METHODS}, comparison=comparison,
        table=side_by_side(results, unit), figure=figure, wall_seconds=wall,
        machine=machine_info(device), loadavg_start=loadavg_start, loadavg_end=loadavg())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(out / "summary.md", summary)
    say(f"summary: {out / 'summary.json'} and {out / 'summary.md'}; total {wall['total'] / 60:.1f} min")
    return summary


if __name__ == "__main__":
    from utils.errors import ProjectError, run_entry
    # the project's errors (data, checkpoints, generalists, settings) and the demo's own DemoError: one line
    # on stderr and exit status 2; anything else is a bug and keeps its traceback
    run_entry(main, errors=(ProjectError, DemoError))
