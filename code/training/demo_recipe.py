"""The demo's recipe, one home for demo.py (one seed, one generalist) and study_generalist.py (several of each).

    s = settings_from(args)                                   # DEFAULTS or QUICK, overridden by the flags, checked
    data = prepare_data(root, s, choice="auto", quick=False)  # the real LA data, else LA-like phantoms
    generalist = prepare_generalist("auto", s, ckpt_dir=..., shipped=...)   # official, shipped, or pretrained
    quality = zero_shot_quality(generalist, data, cases, s, device)         # its Dice with clicks from the truth
    run, result = run_method("SemiSAM", s, data, generalist, cases, model_dir=..., device=...)  # train + evaluate
    comparisons = compare_with_baseline(results)              # each method vs MT, paired per case

Every method of :data:`METHODS` trains with the same data, seed, patches, network and schedule (the official
6000-iteration one compressed to ``iterations``: :func:`schedule`) through ``training.run.main``, the entry point
of the train_LA_*.py scripts; only its own fields (and the generalist, for a generalist term) differ. Progress
and reports go through a ``say(message)`` the caller chooses (``[demo] ...``, ``[study] ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dataloaders.layout import TRAINING_FOLDER, dataset_paths, repo_default
from dataloaders.phantoms import ensure_phantom_dataset
from networks.sam_med3d import arch_to_config, load_generalist, random_generalist
from training.config import TrainConfig
from training.pretrain import PretrainConfig, config_json_path, ensure_pretrained
from training.run import main as train
from utils.compare import evaluate_checkpoint, ground_truth_click_scores, paired_comparison, summarize_scores
from utils.errors import ConfigError
from utils.generalist import GeneralistBranch
from utils.io import atomic_save, atomic_write

__all__ = ["RecipeError", "METHODS", "BASELINE", "DEFAULTS", "QUICK", "NONNEGATIVE", "HELP", "DEMO_ARCH",
           "PRETRAIN_BATCH", "PRETRAIN_TARGETS", "PRETRAIN_STAGES", "LA_SPACING", "CACHE", "OFFICIAL_NAME",
           "SHIPPED_GENERALIST", "DEMO_RESUME_HINT", "ZERO_SHOT_CLICKS", "ZERO_SHOT_CLICK_SEED", "add_setting_flags",
           "check_settings", "settings_from", "phantom_data", "prepare_data", "pretrain_configs", "prepare_generalist",
           "write_random_generalist", "schedule", "train_config", "train_method", "evaluate_method", "run_method",
           "generalist_branch", "zero_shot_quality", "compare_with_baseline", "verdict"]

Say = Callable[[str], None]

# The methods compared, as TrainConfig fields over the settings they share (the names of training.methods'
# and training.generalist_terms' registries, as in train_LA_semisam_mt.py / train_LA_semisam_plus.py); a method
# with a generalist term also gets the chosen generalist. SemiSAM+ here has one generalist, so its confidence
# comes from the prompt variants of 'unc' alone (SemiSAM+'s LA script adds SAM-Med3D-turbo).
METHODS = {"MT": dict(exp="mt", specialist="mt", generalist_term="none"),
           "SemiSAM": dict(exp="semisam_mt", specialist="mt", generalist_term="semisam", prompt="point"),
           "SemiSAM+": dict(exp="semisam_plus", specialist="mt", generalist_term="semisam_plus", prompt="unc")}
BASELINE = "MT"
# sized for a short run on 2 CPU cores (results/demo_cpu.md timed 300 iterations; 600 since phantoms v3, not
# re-timed yet: results/demo_study.md); --quick only checks that every step connects
DEFAULTS = dict(phantom_size=(96, 96, 64), phantom_train=16, phantom_test=8, phantom_seed=0, labeled_num=2,
                iterations=600, batch_size=4, labeled_bs=2, patch_size=(64, 64, 48), n_filters=8, base_lr=0.01,
                seed=1337, num_clicks=10, sam_weight=0.1, pretrain_scale=1.0, stride_xy=16, stride_z=8,
                figure_cases=2, figure_slices=3, sam_check_cases=8, max_test_cases=0)
QUICK = dict(DEFAULTS, phantom_size=(48, 48, 32), phantom_train=4, phantom_test=2, iterations=3, n_filters=4,
             patch_size=(32, 32, 32), num_clicks=2, pretrain_scale=0.0004, stride_z=16, figure_cases=1,
             figure_slices=2, sam_check_cases=2)
NONNEGATIVE = ("phantom_seed", "seed", "sam_weight", "max_test_cases")
HELP = dict(iterations="training iterations of each method", num_clicks="generalist clicks per unlabeled patch",
            sam_check_cases="test cases on which SAM's pseudo-labels are scored", labeled_num="labeled scans",
            max_test_cases="evaluate only the first N test cases (0: all)",
            pretrain_scale="length of --generalist pretrain's stages, as a fraction of the shipped recipe's")
LA_SPACING = (0.625, 0.625, 0.625)
# The shipped demo generalist's recipe (model/README.md), which `--generalist pretrain` repeats: two runs of
# pretrain_generalist.py on the synthetic shape corpus, each with --arch DEMO_ARCH --batch_size PRETRAIN_BATCH
# --targets_per_image PRETRAIN_TARGETS, its stage's flags, and the others at their defaults; stage 2 starts
# (--init) from stage 1's weights. Stage 1 is the first 5000 iterations of a 12000-iteration cosine schedule with 5
# clicks (the training protocol of SAM-Med3D); stage 2 trains with 10 clicks, as SemiSAM and eval_generalist.py
# prompt (results/demo_study.md: with 5 the Dice stopped rising after 5 clicks).
DEMO_ARCH, PRETRAIN_BATCH, PRETRAIN_TARGETS = "vit_small_demo", 2, 4
PRETRAIN_STAGES = (dict(iterations=12000, stop_at=5000, lr=8e-4, warmup=200, num_clicks=5, seed=1337),
                   dict(iterations=2500, stop_at=None, lr=4e-4, warmup=50, num_clicks=10, seed=1338))
# (phantom folder under the data root, pretrained demo generalist under the checkpoint folder) per --quick
CACHE = {False: ("phantoms", "demo_generalist.pth"), True: ("phantoms_quick", "demo_generalist_quick.pth")}
OFFICIAL_NAME = "sam_med3d.pth"
# the demo generalist released with the repository (its architecture JSON beside it, config_json_path), written
# relative to code/ as the scripts' default paths are (dataloaders.layout.repo_default)
SHIPPED_GENERALIST = "../model/released/demo_generalist.pth"
# what an interrupted demo run's training log says (demo.py retrains every method when run again)
DEMO_RESUME_HINT = "running the same command again retrains this method from its start"
# a generalist's own quality: clicks simulated from the ground truth, as eval_generalist.py's defaults
ZERO_SHOT_CLICKS, ZERO_SHOT_CLICK_SEED = 10, 0


class RecipeError(ConfigError):
    """A setting or input of the demo recipe that cannot work (the message names the flag or file)."""


# ----------------------------------------------------------------------------------------------- settings
def add_setting_flags(parser: argparse.ArgumentParser, defaults: dict = DEFAULTS, quick: dict = QUICK) -> None:
    """One flag per preset setting (``--iterations``, ``--patch_size X Y Z``, ...), absent from the namespace
    unless given, so that :func:`settings_from` can tell a flag from the preset's value."""
    for key, value in defaults.items():
        shape = dict(nargs=3, metavar=("X", "Y", "Z")) if isinstance(value, tuple) else {}
        parser.add_argument(f"--{key}", type=type(value[0] if shape else value), default=argparse.SUPPRESS, **shape,
                            help=f"{HELP.get(key, key.replace('_', ' '))} (default {value}; --quick: {quick[key]})")


def check_settings(s: dict) -> dict:
    """Raise RecipeError (naming the flag) for settings that cannot work; returns ``s``."""
    for key, value in s.items():
        low = min(value) if isinstance(value, tuple) else value
        if low < 0 or (low == 0 and key not in NONNEGATIVE):
            bound = ">= 0" if key in NONNEGATIVE else ">= 1" if isinstance(low, int) else "> 0"
            raise RecipeError(f"--{key} must be {bound}, got {value}")
    if any(p % 16 for p in s["patch_size"]):
        raise RecipeError(f"--patch_size {s['patch_size']}: each size must be a multiple of 16 (V-Net)")
    if not s["labeled_bs"] < s["batch_size"]:
        raise RecipeError(f"--labeled_bs {s['labeled_bs']} must be < --batch_size {s['batch_size']} (MT and SemiSAM "
                          "need unlabeled patches in every batch)")
    return s


def settings_from(args: argparse.Namespace, defaults: dict = DEFAULTS, quick: dict = QUICK) -> dict:
    """The preset (``defaults``, or ``quick`` with ``args.quick``) overridden by the flags given; checked."""
    s = dict(quick if args.quick else defaults)
    s.update({k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in defaults})
    return check_settings(s)


# ----------------------------------------------------------------------------------------------- data
def phantom_data(out, s: dict, progress: bool = False) -> dict:
    """The phantoms of settings ``s`` in folder ``out`` (written once, reused while the settings match):
    dict(kind='phantoms', action 'written' | 'reused', spacing=None, root_path, train_list, test_list)."""
    action = ensure_phantom_dataset(out, s["phantom_train"], s["phantom_test"], s["phantom_size"], s["phantom_seed"],
                                    progress=progress)
    return dict(dataset_paths(out), kind="phantoms", action=action, spacing=None)


def prepare_data(root, s: dict, *, choice: str = "auto", quick: bool = False, progress: bool = True,
                 say: Say = print) -> dict:
    """The real LA data in ``root`` (``choice`` 'auto' or 'la'), else LA-like phantoms written once to
    ``root/phantoms[_quick]/`` ('auto' or 'phantoms'): dict(kind, action, spacing, root_path, train_list,
    test_list)."""
    root = Path(root)
    la = dataset_paths(root)
    if choice == "la" and la is None:
        raise RecipeError(f"--data la: expected {root / TRAINING_FOLDER}/ with {root / 'train.list'} and "
                          f"{root / 'test.list'} (see data/README.md)")
    if la is not None and choice != "phantoms":
        say(f"data: the real LA data in {root} (distances in mm, spacing {LA_SPACING})")
        return dict(la, kind="LA", action="found", spacing=list(LA_SPACING))
    out = root / CACHE[quick][0]
    data = phantom_data(out, s, progress)
    say(f"data: no real LA data in {root}; synthetic LA-like phantoms {data['action']} in {out} ({s['phantom_train']} "
        f"train + {s['phantom_test']} test, {s['phantom_size']} voxels)")
    return data


# ----------------------------------------------------------------------------------------------- generalist
def pretrain_configs(s: dict, ckpt_dir, quick: bool, device: str, progress: bool) -> list[PretrainConfig]:
    """The stages of the shipped demo generalist's recipe (:data:`PRETRAIN_STAGES`), each stage's iterations,
    stop and warmup scaled by ``s['pretrain_scale']`` (1: the shipped recipe). The last stage writes
    ``<ckpt_dir>/demo_generalist[_quick].pth``, stage i before it ``..._stage<i>.pth``, and each later stage starts
    from the one before."""
    k, final = s["pretrain_scale"], Path(ckpt_dir) / CACHE[quick][1]
    cfgs: list[PretrainConfig] = []
    for i, stage in enumerate(PRETRAIN_STAGES, 1):
        n = max(1, round(stage["iterations"] * k))
        stop = None if stage["stop_at"] is None else min(n, max(1, round(stage["stop_at"] * k)))
        out = final if i == len(PRETRAIN_STAGES) else final.with_name(f"{final.stem}_stage{i}{final.suffix}")
        length = stop or n
        cfgs.append(PretrainConfig(
            out=str(out), arch=DEMO_ARCH, init=cfgs[-1].out if cfgs else None, iterations=n, stop_at=stop,
            batch_size=PRETRAIN_BATCH, targets_per_image=PRETRAIN_TARGETS, lr=stage["lr"],
            warmup=round(stage["warmup"] * k), num_clicks=stage["num_clicks"], seed=stage["seed"], device=device,
            log_every=max(1, min(100, length // 10)), save_every=max(1, min(100, length // 5)), progress=progress))
    return cfgs


def prepare_generalist(choice: str, s: dict, *, ckpt_dir, shipped=None, arch: str = "vit_b_ori",
                       quick: bool = False, skip_pretrain: bool = False, device: str = "cpu", progress: bool = True,
                       say: Say = print) -> dict:
    """The generalist: dict(path, arch (registry name or JSON file), kind, action, ...).

    ``choice``: 'auto' = ``<ckpt_dir>/sam_med3d.pth`` (the official SAM-Med3D) if present, else the shipped demo
    generalist ``shipped`` (default the repository's :data:`SHIPPED_GENERALIST`; its architecture JSON beside it)
    if present, else as 'pretrain'; 'pretrain' = the demo generalist trained here from random weights on synthetic
    shapes with the shipped generalist's recipe (:func:`pretrain_configs`; ``ckpt_dir/demo_generalist[_quick].pth``:
    each stage reused when it holds a finished run of exactly its settings, resumed when interrupted;
    ``skip_pretrain``: used as it is);
    anything else = the path of a checkpoint of architecture ``arch``."""
    if choice not in ("auto", "pretrain"):
        if not Path(choice).is_file():
            raise RecipeError(f"--generalist {choice}: checkpoint not found")
        say(f"generalist: {choice} ({arch})")
        return dict(path=choice, arch=arch, kind="given", action="given")
    official, shipped = Path(ckpt_dir) / OFFICIAL_NAME, Path(shipped or repo_default(SHIPPED_GENERALIST))
    if choice == "auto" and official.is_file():
        say(f"generalist: the official SAM-Med3D {official}"
            + ("; ViT-B on two 128^3 inputs per step makes SemiSAM slow on a CPU" if device == "cpu" else ""))
        return dict(path=str(official), arch="vit_b_ori", kind="SAM-Med3D", action="found")
    if choice == "auto" and shipped.is_file():
        arch_json = config_json_path(shipped)
        if not arch_json.is_file():
            raise RecipeError(f"the shipped demo generalist {shipped} has no architecture file {arch_json} beside "
                              "it; restore both, or pass --generalist pretrain")
        say(f"generalist: the shipped demo generalist {shipped} ({arch_json.name})")
        return dict(path=str(shipped), arch=str(arch_json), kind="shipped demo", action="found")
    cfgs = pretrain_configs(s, ckpt_dir, quick, device, progress)
    total = sum(c.stop_at or c.iterations for c in cfgs)
    if choice == "auto":
        say(f"generalist: no {official} and no shipped demo generalist {shipped}: pretraining the demo generalist "
            f"here ({total} iterations in {len(cfgs)} stages; on a CPU that takes hours, and a shorter one "
            "(--pretrain_scale) knows too little for SemiSAM to gain from it)")
    final = cfgs[-1].out
    info = dict(path=final, arch=str(config_json_path(final)), kind="demo", pretrain_arch=DEMO_ARCH,
                pretrain_iterations=total)
    if not skip_pretrain:
        stages = [ensure_pretrained(cfg, say=lambda m, i=i: say(f"generalist: stage {i}/{len(cfgs)}: {m}"))
                  for i, cfg in enumerate(cfgs, 1)]
        return dict(info, **stages[-1], stages=stages)
    if not Path(final).is_file() or not config_json_path(final).is_file():
        raise RecipeError(f"--skip_pretrain: {final} or {config_json_path(final)} does not exist; run once "
                          "without --skip_pretrain to train it")
    say(f"generalist: using {final} as it is (--skip_pretrain)")
    iteration = torch.load(final, map_location="cpu", weights_only=True).get("iteration")
    return dict(info, action="used as is", pretrain_iterations=None, final_stage_iteration=iteration)


def write_random_generalist(arch: str, path, seed: int = 0) -> str:
    """Random weights of ``arch`` (``networks.sam_med3d.random_generalist``) as a checkpoint in the official
    format (``{'model_state_dict', 'config'}``, its architecture JSON beside it: ``config_json_path``), so that
    training loads it like any other generalist. Written once: a file of the same architecture is kept
    (the weights are a function of ``arch`` and ``seed``). Returns 'written' or 'reused'."""
    path = Path(path)
    config = json.loads(json.dumps(arch_to_config(arch)))   # as the JSON file holds it (lists, not tuples)
    arch_json = config_json_path(path)
    if path.is_file() and arch_json.is_file() and json.loads(arch_json.read_text()) == config:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("random_seed") == seed:
            return "reused"
    model = random_generalist(config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model_state_dict": model.state_dict(), "config": config, "random_seed": seed}, path)
    atomic_write(arch_json, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return "written"


def generalist_branch(generalist: dict, num_clicks: int, seed: int, device: str) -> GeneralistBranch:
    """The generalist of :func:`prepare_generalist` prompted with 'point' clicks, as SemiSAM training prompts it
    (clicks drawn from ``seed``)."""
    model = load_generalist(generalist["path"], arch=generalist["arch"], device=device)
    return GeneralistBranch([model], prompt="point", num_clicks=num_clicks,
                            generator=torch.Generator().manual_seed(seed))


def zero_shot_quality(generalist: dict, data: dict, cases: Sequence[str], s: dict, device: str,
                      say: Optional[Say] = None) -> dict:
    """How good the generalist is on this data before any training: ``ZERO_SHOT_CLICKS`` clicks simulated from
    the ground truth of each test case, in the crop of the training patch centred on the target
    (``utils.compare.ground_truth_click_scores``). It reads test labels: a report, never part of training.

    Returns dict(num_clicks, click_seed, crop, summary (``summarize_scores``: n, dice_mean, dice_std, dice_min in
    %), cases (per case: case, dice (fraction), box, target_voxels), statement)."""
    branch = generalist_branch(generalist, ZERO_SHOT_CLICKS, ZERO_SHOT_CLICK_SEED, device)
    records = ground_truth_click_scores(branch, data["root_path"], cases, s["patch_size"], device, say)
    summary = summarize_scores(records)
    crop = "x".join(map(str, s["patch_size"]))
    statement = (f"Generalist quality on {summary['n']} test case(s): with {ZERO_SHOT_CLICKS} clicks from the ground "
                 f"truth, in the {crop} crop of a training patch around the target, it reaches Dice "
                 f"{summary['dice_mean']:.1f} % (zero-shot; lowest case {summary['dice_min']:.1f} %).")
    return dict(num_clicks=ZERO_SHOT_CLICKS, click_seed=ZERO_SHOT_CLICK_SEED, crop=list(s["patch_size"]),
                summary=summary, cases=records, statement=statement)


# ----------------------------------------------------------------------------------------------- one method
def schedule(iterations: int) -> dict:
    """The official schedule (lr step 2500, ramp blocks of 150, of 6000 iterations) compressed to ``iterations``."""
    return dict(lr_step=max(1, round(2500 * iterations / 6000)), rampup_block=max(1, round(150 * iterations / 6000)))


def train_config(name: str, s: dict, data: dict, generalist: Optional[dict], *, model_dir, device: str,
                 channels_last: Optional[bool] = None, progress: bool = True, **fields) -> TrainConfig:
    """The TrainConfig of method ``name``: every method gets the same data, seed, patches, network and schedule;
    only its ``METHODS`` fields (and the generalist, for a generalist term) differ. The run folder is
    ``<model_dir>/<exp>``; ``fields`` override the rest (e.g. ``overwrite=False, resume='auto'``)."""
    values = dict(root_path=data["root_path"], train_list=data["train_list"], labeled_num=s["labeled_num"],
                  patch_size=s["patch_size"], batch_size=s["batch_size"], labeled_bs=s["labeled_bs"],
                  num_workers=0, cache=data["kind"] == "phantoms", model_dir=str(model_dir),
                  save_every=s["iterations"], image_every=10**9, progress=progress, max_iterations=s["iterations"],
                  base_lr=s["base_lr"], seed=s["seed"], n_filters=s["n_filters"], device=device,
                  channels_last=channels_last,
                  # by default the caller owns its run folders (a rerun retrains: the old files move to
                  # previous_<UTC time>/) and has chosen the thread count already (training would otherwise
                  # choose again from the load)
                  overwrite=True, threads=torch.get_num_threads(),
                  **schedule(s["iterations"]), **METHODS[name])
    if values["generalist_term"] != "none":
        if generalist is None:
            raise RecipeError(f"method {name} needs a generalist")
        values.update(generalist=[generalist["path"]], generalist_arch=generalist["arch"],
                      num_clicks=s["num_clicks"], sam_weight=s["sam_weight"])
    values.update(fields)
    return TrainConfig(**values).validate()


def train_method(cfg: TrainConfig, resume_hint: Optional[str] = None) -> dict:
    """Train ``cfg`` as the train_LA_*.py scripts do: ``training.run.main(fields, argv=[])`` rebuilds exactly this
    TrainConfig (no flags to parse) and runs it; ``resume_hint`` is what an interrupted run's log tells the user
    to do (default: the demo's answer, rerun from the start). Returns dict(checkpoint (the last iteration's
    student), last_losses, seconds)."""
    start = time.perf_counter()
    trainer = train(dataclasses.asdict(cfg), [], resume_hint=resume_hint or DEMO_RESUME_HINT)
    last = trainer.last_result.values if trainer.last_result is not None else {}
    return dict(checkpoint=str(cfg.snapshot_path / f"iter_{cfg.max_iterations}.pth"),
                last_losses={k: float(v) for k, v in last.items()}, seconds=time.perf_counter() - start)


def evaluate_method(label: str, checkpoint, data: dict, s: dict, cases: Sequence[str], device: str, keep: int = 0,
                    say: Say = print) -> dict:
    """test_LA.py's protocol on ``cases`` with the recipe's window and strides (``evaluate_checkpoint``: per-case
    lines ``[evaluate <label>] case i/n ...`` through ``say``; predictions of the first ``keep`` cases kept)."""
    return evaluate_checkpoint(checkpoint, data["root_path"], cases, patch_size=s["patch_size"],
                               stride_xy=s["stride_xy"], stride_z=s["stride_z"], spacing=data["spacing"],
                               device=device, name=f"evaluate {label}", keep=keep, say=say)


def run_method(name: str, s: dict, data: dict, generalist: Optional[dict], cases: Sequence[str], *, model_dir,
               device: str, channels_last: Optional[bool] = None, progress: bool = True, keep: int = 0,
               say: Say = print, evaluate_say: Say = print, **fields) -> tuple[dict, dict]:
    """Train method ``name`` (:func:`train_config`, :func:`train_method`) and evaluate its last checkpoint
    (:func:`evaluate_method`). Returns (run: dict(checkpoint, last_losses, seconds), result of
    ``evaluate_checkpoint``)."""
    cfg = train_config(name, s, data, generalist, model_dir=model_dir, device=device, channels_last=channels_last,
                       progress=progress, **fields)
    say(f"training {name} for {cfg.max_iterations} iterations -> {cfg.snapshot_path}")
    run = train_method(cfg)
    return run, evaluate_method(name, run["checkpoint"], data, s, cases, device, keep, evaluate_say)


# ----------------------------------------------------------------------------------------------- comparing
def compare_with_baseline(results: dict, baseline: str = BASELINE) -> list[dict]:
    """``utils.compare.paired_comparison`` of every method of ``results`` ({name: evaluate_checkpoint result})
    against ``baseline``, in order."""
    return [paired_comparison(results[baseline], results[n], baseline, n) for n in results if n != baseline]


def verdict(quality: dict, check: dict, comparisons: Sequence[dict], baseline: str = BASELINE) -> str:
    """One paragraph: how good the generalist is here (zero-shot from the ground truth; prompted from
    ``baseline``'s predictions, next to ``baseline``'s own Dice in the same crop: ``check`` of
    ``utils.compare.check_generalist``) and whether each method beat ``baseline`` beyond noise
    (``paired_comparison``'s two-standard-error rule)."""
    b = check[baseline]
    text = (f"Verdict: the generalist reaches Dice {quality['summary']['dice_mean']:.1f} % with "
            f"{quality['num_clicks']} clicks from the ground truth (zero-shot) and {b['sam_dice']:.1f} % when "
            f"prompted from {baseline}'s predictions, where {baseline} itself has {b['prompt_dice']:.1f} %. ")
    parts = []
    for c in comparisons:
        if c["n_cases"] < 2:
            noise = "one case: no noise estimate"
        else:
            noise = (("beyond" if c["beyond_noise"] else "within")
                     + f" noise (two standard errors: {2 * c['standard_error_points']:.2f})")
        parts.append(f"{c['other']} {c['dice_difference_points']:+.2f} points vs {baseline}, {noise}")
    return text + "; ".join(parts) + "."
