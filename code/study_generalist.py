r"""SemiSAM's gain over MT as a function of the generalist's quality, on the phantoms with the demo's recipe.

    python study_generalist.py --generalists random=random:vit_tiny_demo \
        shipped=../model/released/demo_generalist.pth official=../ckpt/sam_med3d.pth:vit_b_ori

Each generalist is NAME=SPEC: a checkpoint PATH with its architecture JSON beside it (PATH with suffix .json, as
pretrain_generalist.py writes it), PATH:ARCH (ARCH a registry name such as vit_b_ori, or a JSON config), or
random:ARCH (random weights, written once to <work>/generalists/NAME.pth in the official format).

1. data: the demo's LA-like phantoms (--phantom_train: the demo's count; --phantom_test: 20, so that per-case
   statistics are less noisy), written once to <work>/phantoms/;
2. each generalist's zero-shot Dice: 10 clicks simulated from the ground truth of each test case, in the crop of
   the training patch around the target (eval_generalist.py's measure);
3. for each seed: MT once (it has no generalist), and each method (--methods) with each generalist, trained with
   the demo's recipe (training.demo_recipe) and evaluated on the test phantoms with test_LA.py's protocol;
4. per generalist and method: the mean Dice over the seeds, and the gain over MT in points: each test case's
   paired difference averaged over the seeds, with a 95 % t interval over the cases.

Writes <out>/study.json (everything, with the machine and the commit), study.md (the table) and
gain_vs_generalist.png. Each run keeps its result, with the settings that made it, in
<work>/runs/seed<S>/<generalist>/<exp>/study_result.json: the same command again skips finished runs, evaluates
a trained one, resumes a run stopped by Ctrl-C from its train state, and retrains a run whose settings or
generalist changed (the training code moves the old files to previous_<UTC time>/).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dataloaders.la_heart import read_list
from dataloaders.layout import REPO_ROOT, repo_default
from dataloaders.phantoms import MANIFEST
from networks.sam_med3d import arch_to_config
from training.demo_recipe import (BASELINE, CACHE, DEFAULTS, METHODS, QUICK, ZERO_SHOT_CLICKS, ZERO_SHOT_CLICK_SEED,
                                  add_setting_flags, evaluate_method, phantom_data, schedule, settings_from,
                                  train_config, train_method, write_random_generalist, zero_shot_quality)
from training.engine import TRAIN_STATE_NAME
from training.interrupt import TrainingInterrupted
from training.pretrain import config_json_path
from training.state import RESUME_FIXED_KEYS, TrainStateError, load_train_state
from utils.cli import HelpFormatter
from utils.compare import seed_averaged_gain
from utils.errors import ConfigError, ProjectError, run_entry
from utils.figures import save_gain_figure
from utils.io import atomic_write, file_sha256
from utils.report import study_markdown
from utils.runtime import default_threads, machine_info, resolve_device

# the demo's settings that a study uses, with 20 test cases: not those of the demo generalist's pretraining, its
# figure and check, nor the seed (--seeds)
STUDY_DEFAULTS = {k: v for k, v in dict(DEFAULTS, phantom_test=20).items()
                  if not k.startswith(("pretrain_", "figure_")) and k not in ("sam_check_cases", "seed")}
STUDY_QUICK = {k: QUICK[k] for k in STUDY_DEFAULTS}
SEEDS = (1337, 1338, 1339)
STUDY_METHODS = ("SemiSAM", "SemiSAM+")
CONFIDENCE = 0.95
RANDOM_SEED = 0            # the weights of random:ARCH, as eval_generalist.py --random_arch's default seed
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
BASELINE_FOLDER = "baseline"      # <work>/runs/seed<S>/baseline/mt; no generalist may take this name
RESULT_NAME, KEY_NAME = "study_result.json", "study_key.json"
RESUME_HINT = "running the same study_generalist.py command again resumes from it"
ABOUT = ("Does SemiSAM help more when its generalist knows more? Each method is trained with each generalist "
         "and compared with MT trained with the same seed on the same data (the demo's recipe); the generalist's "
         "quality is its zero-shot Dice with clicks from the ground truth.")


class StudyError(ConfigError):
    """A study input that cannot work (the message names the flag and value)."""


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--generalists", nargs="+", required=True, metavar="NAME=SPEC",
      help="generalists: NAME=PATH (architecture JSON beside it), NAME=PATH:ARCH or NAME=random:ARCH")
    a("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (MT and every method per seed)")
    a("--methods", nargs="+", default=list(STUDY_METHODS), choices=[m for m in METHODS if m != BASELINE],
      help="methods compared with MT")
    a("--out", default=repo_default("../results/generalist_study"), help="folder of study.json, study.md and the figure")
    a("--work", default=repo_default("../model/generalist_study"), help="folder of the runs, phantoms and caches")
    a("--quick", action="store_true", help="tiny smoke-test setting (seconds per run; meaningless numbers)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--threads", type=int, default=0, help="torch CPU threads (0: the cores the load average leaves idle)")
    a("--channels_last", choices=("auto", "1", "0"), default="auto", help="training memory layout")
    a("--no_progress", action="store_true", help="no progress bars or lines")
    add_setting_flags(p, STUDY_DEFAULTS, STUDY_QUICK)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- inputs
def parse_generalist(text: str) -> dict:
    """NAME=SPEC -> dict(name, spec, kind 'random' | 'checkpoint', path (None for random), arch); StudyError for
    a malformed text or a missing file (the architecture is checked by :func:`materialise`)."""
    name, sep, spec = text.partition("=")
    if not sep or not spec or not NAME.match(name):
        raise StudyError(f"--generalists {text!r}: expected NAME=SPEC, NAME of letters, digits and _.+- (first a "
                         "letter or digit), SPEC a checkpoint path, PATH:ARCH or random:ARCH")
    if name == BASELINE_FOLDER:
        raise StudyError(f"--generalists {text!r}: the name {BASELINE_FOLDER!r} is the baseline's folder; choose "
                         "another")
    if spec.startswith("random:"):
        if not spec[len("random:"):]:
            raise StudyError(f"--generalists {text!r}: random:ARCH needs an architecture (registry name or JSON)")
        return dict(name=name, spec=spec, kind="random", path=None, arch=spec[len("random:"):])
    if Path(spec).is_file():
        beside = config_json_path(spec)
        if not beside.is_file():
            raise StudyError(f"--generalists {text!r}: no architecture file {beside} beside the checkpoint; give "
                             f"{name}=PATH:ARCH (ARCH a registry name such as vit_b_ori, or a JSON config)")
        return dict(name=name, spec=spec, kind="checkpoint", path=spec, arch=str(beside))
    path, sep, arch = spec.rpartition(":")
    if sep and path and arch and Path(path).is_file():
        return dict(name=name, spec=spec, kind="checkpoint", path=path, arch=arch)
    raise StudyError(f"--generalists {text!r}: checkpoint {path if sep and path and arch else spec} not found")


def check_inputs(args) -> list[dict]:
    """The parsed generalists; StudyError for repeated names, seeds or methods, or an empty list."""
    generalists = [parse_generalist(t) for t in args.generalists]
    for flag, values in (("--generalists", [g["name"] for g in generalists]), ("--seeds", args.seeds),
                         ("--methods", args.methods)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise StudyError(f"{flag}: {', '.join(repeated)} given more than once")
    if any(seed < 0 for seed in args.seeds):
        raise StudyError(f"--seeds must be >= 0, got {args.seeds}")
    for g in generalists:
        arch_to_config(g["arch"])    # an unknown architecture stops the study before any work
    return generalists


def _plain(obj):
    """``obj`` as JSON gives it back (tuples become lists), so that a key compares equal to its cached copy."""
    return json.loads(json.dumps(obj))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):    # absent, or cut short by a crash: not a cache entry
        return None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def materialise(g: dict, work: Path) -> dict:
    """The generalist as a file the training code loads: random weights written once to
    ``<work>/generalists/<name>.pth`` (official format, architecture JSON beside it); plus its sha256 and
    architecture config, which identify it in the caches."""
    if g["kind"] == "random":
        path = work / "generalists" / f"{g['name']}.pth"
        action = write_random_generalist(g["arch"], path, RANDOM_SEED)
        say(f"generalist {g['name']}: random weights of {g['arch']} (seed {RANDOM_SEED}) {action} in {path}")
        g = dict(g, path=str(path), arch=str(config_json_path(path)), random_seed=RANDOM_SEED)
    return dict(g, sha256=file_sha256(g["path"]), config=_plain(arch_to_config(g["arch"])))


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD's commit, whether the work tree has uncommitted changes), or (None, None) without git."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


# ----------------------------------------------------------------------------------------------- steps
def zero_shot(g: dict, data: dict, cases: list, s: dict, device: str, work: Path) -> dict:
    """The generalist's zero-shot quality (``zero_shot_quality``), cached in ``<work>/zero_shot/<name>.json``
    while the generalist, the cases, the crop and the clicks stay the same."""
    key = _plain(dict(sha256=g["sha256"], config=g["config"], cases=cases, data=data["manifest"],
                      crop=s["patch_size"], clicks=ZERO_SHOT_CLICKS, click_seed=ZERO_SHOT_CLICK_SEED))
    path = work / "zero_shot" / f"{g['name']}.json"
    cached = _read_json(path)
    if cached and cached.get("key") == key:
        quality, source = cached["quality"], "cached"
    else:
        quality, source = zero_shot_quality(g, data, cases, s, device), "computed"
        _write_json(path, dict(key=key, quality=quality))
    say(f"generalist {g['name']} ({source}): {quality['statement']}")
    return dict(quality, source=source)


def run_key(cfg, g: Optional[dict], s: dict, data: dict, cases: list) -> dict:
    """What makes a run's result: the settings that fix its trajectory (the training code's own list,
    ``training.state.RESUME_FIXED_KEYS``, and its length), the generalist's file and architecture, the data,
    the test cases and the evaluation's window."""
    d = cfg.to_dict()
    return _plain(dict(train={k: d[k] for k in RESUME_FIXED_KEYS if k in d}, max_iterations=cfg.max_iterations,
                       amp=cfg.amp, generalist=None if g is None else dict(sha256=g["sha256"], config=g["config"]),
                       data=data["manifest"], cases=cases,
                       evaluation=dict(patch_size=s["patch_size"], stride_xy=s["stride_xy"], stride_z=s["stride_z"])))


def training_plan(cfg, key: dict) -> tuple[str, str]:
    """('done' | 'resume' | 'fresh', why) for the run folder of ``cfg``: done = trained with these settings (its
    train state at the last iteration, the last checkpoint there); resume = these settings, stopped earlier
    (Ctrl-C saves a train state); fresh = anything else (the training code moves old files aside)."""
    folder = cfg.snapshot_path
    if _read_json(folder / KEY_NAME) != key:
        return "fresh", "no run of these settings yet"
    state_path = folder / TRAIN_STATE_NAME
    if not state_path.is_file():
        return "fresh", "its earlier start left no train state"
    try:
        iteration = int(load_train_state(state_path)["iteration"])
    except ProjectError as err:
        return "fresh", f"its train state cannot be read ({err})"
    if iteration >= cfg.max_iterations and (folder / f"iter_{cfg.max_iterations}.pth").is_file():
        return "done", f"trained to iteration {iteration} before its evaluation stopped"
    return "resume", f"stopped at iteration {iteration} of {cfg.max_iterations}"


def run_one(label: str, name: str, g: Optional[dict], seed: int, s: dict, data: dict, cases: list, args,
            device: str, work: Path) -> dict:
    """One run (method ``name``, generalist ``g`` or None, ``seed``): its cached result, or trained (resumed) and
    evaluated, the result written to ``<run>/study_result.json``. Returns the record: label, seed, method,
    generalist, source ('cached' | 'trained' | 'resumed' | 'evaluated'), run folder, train_seconds, result."""
    model_dir = work / "runs" / f"seed{seed}" / (g["name"] if g else BASELINE_FOLDER)
    cfg = train_config(name, dict(s, seed=seed), data, g, model_dir=model_dir, device=device,
                       channels_last=None if args.channels_last == "auto" else args.channels_last == "1",
                       progress=not args.no_progress)
    key, folder = run_key(cfg, g, s, data, cases), cfg.snapshot_path
    cached = _read_json(folder / RESULT_NAME)
    if cached and cached.get("key") == key:
        say(f"{label}: cached, Dice {100 * cached['result']['mean']['dice']:.2f} % ({folder / RESULT_NAME})")
        return dict(cached, source="cached")
    plan, why = training_plan(cfg, key)
    train_seconds = 0.0
    if plan == "resume":
        say(f"{label}: resuming {folder} ({why})")
        try:
            train_seconds = train_method(train_config(
                name, dict(s, seed=seed), data, g, model_dir=model_dir, device=device, channels_last=cfg.channels_last,
                progress=cfg.progress, overwrite=False, resume="auto"), RESUME_HINT)["seconds"]
        except TrainStateError as err:     # the training code refused the state: start afresh
            say(f"{label}: cannot resume ({err}); training afresh")
            plan = "fresh"
    if plan == "fresh":
        say(f"{label}: training {cfg.max_iterations} iterations -> {folder} ({why})")
        _write_json(folder / KEY_NAME, key)
        train_seconds = train_method(cfg, RESUME_HINT)["seconds"]
    if plan == "done":
        say(f"{label}: {why}; evaluating it")
    checkpoint = folder / f"iter_{cfg.max_iterations}.pth"
    result = evaluate_method(label, checkpoint, data, s, cases, device)
    result.pop("predictions")
    record = dict(label=label, seed=seed, method=name, generalist=g["name"] if g else None, folder=str(folder),
                  train_seconds=train_seconds, result=result, key=key)
    _write_json(folder / RESULT_NAME, record)
    say(f"{label}: Dice {100 * result['mean']['dice']:.2f} %")
    return dict(record, source={"fresh": "trained", "resume": "resumed", "done": "evaluated"}[plan])


def summarize(generalists: list, methods: list, seeds: list, runs: dict) -> list[dict]:
    """The study's table rows: the baseline's mean Dice over seeds, then per generalist and method its mean
    Dice over seeds and ``seed_averaged_gain`` over the baseline. ``runs``: {(seed, generalist name or None,
    method): record}."""
    def dice(records):
        return [100 * r["result"]["mean"]["dice"] for r in records]
    base = [runs[(seed, None, BASELINE)] for seed in seeds]
    rows = [dict(generalist=None, zero_shot_dice=None, method=BASELINE, mean_dice=float(np.mean(dice(base))),
                 dice_per_seed=dice(base), gain=None)]
    for g in generalists:
        for method in methods:
            other = [runs[(seed, g["name"], method)] for seed in seeds]
            gain = seed_averaged_gain([r["result"] for r in base], [r["result"] for r in other], CONFIDENCE)
            rows.append(dict(generalist=g["name"], zero_shot_dice=g["zero_shot"]["summary"]["dice_mean"],
                             method=method, mean_dice=float(np.mean(dice(other))), dice_per_seed=dice(other),
                             gain=gain))
    return rows


def main(argv=None) -> dict:
    """Run (or continue) the study; returns the study dict (also written to <out>/study.json)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    s = settings_from(args, STUDY_DEFAULTS, STUDY_QUICK)
    generalists = check_inputs(args)
    device, threads_before = str(resolve_device(args.device)), torch.get_num_threads()
    torch.set_num_threads(default_threads(args.threads))
    try:
        return run_study(args, argv, s, generalists, device)
    except KeyboardInterrupt as stop:    # TrainingInterrupted (a KeyboardInterrupt) saved a train state first
        say("interrupted; the same command continues: finished runs are kept"
            + (", the stopped one resumes from its train state" if isinstance(stop, TrainingInterrupted) else ""))
        raise SystemExit(getattr(stop, "exit_status", 130)) from None
    finally:
        torch.set_num_threads(threads_before)   # callers in the same process keep their setting


def run_study(args, argv: list, s: dict, generalists: list, device: str) -> dict:
    """Steps 1-4 with checked settings ``s`` and parsed ``generalists``; writes the outputs."""
    start, work, out = time.perf_counter(), Path(args.work), Path(args.out)
    m = machine_info(device)
    say(ABOUT + (" (--quick: smoke-test settings, the numbers mean nothing)" if args.quick else ""))
    say(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} with {m['torch_threads']} "
        f"thread(s) on {device}, load average {m['loadavg']}")
    folder = work / CACHE[args.quick][0]
    data = phantom_data(folder, s, progress=not args.no_progress)
    data["manifest"] = json.loads((folder / MANIFEST).read_text())
    cases = read_list(data["test_list"])[:s["max_test_cases"] or None]
    say(f"data: phantoms {data['action']} in {folder} ({s['phantom_train']} train, {s['labeled_num']} labeled; "
        f"{len(cases)} test cases)")
    generalists = [materialise(g, work) for g in generalists]
    for g in generalists:
        g["zero_shot"] = zero_shot(g, data, cases, s, device, work)
    plan = [(seed, g, method) for seed in args.seeds
            for g, method in [(None, BASELINE)] + [(g, m_) for g in generalists for m_ in args.methods]]
    runs = {}
    for i, (seed, g, method) in enumerate(plan, 1):
        label = f"run {i}/{len(plan)} seed {seed} {method}" + (f" with {g['name']}" if g else "")
        runs[(seed, g["name"] if g else None, method)] = run_one(label, method, g, seed, s, data, cases, args,
                                                                 device, work)
    for (seed, _, _), record in runs.items():
        base = runs[(seed, None, BASELINE)]["result"]["mean"]["dice"]
        record["vs_baseline_points"] = (None if record["method"] == BASELINE
                                        else 100 * (record["result"]["mean"]["dice"] - base))
    rows = summarize(generalists, args.methods, args.seeds, runs)
    commit, dirty = git_commit()
    study = dict(about=ABOUT, quick=args.quick, command=["study_generalist.py", *argv],
                 settings=dict(s, **schedule(s["iterations"]), device=device, threads=torch.get_num_threads()),
                 seeds=args.seeds, methods=args.methods, baseline=BASELINE, confidence=CONFIDENCE,
                 zero_shot_clicks=ZERO_SHOT_CLICKS, n_test_cases=len(cases),
                 data={k: data[k] for k in ("kind", "action", "root_path", "manifest")},
                 generalists=generalists, runs=[{k: v for k, v in r.items() if k != "key"} for r in runs.values()],
                 rows=rows, machine=m, commit=commit, commit_dirty=dirty, work=str(work))
    points = [dict(method=r["method"], label=r["generalist"], x=r["zero_shot_dice"], gain=r["gain"]["gain_points"],
                   low=r["gain"]["ci_low"], high=r["gain"]["ci_high"]) for r in rows if r["gain"] is not None]
    figure = save_gain_figure(
        out / "gain_vs_generalist.png", points, xlabel=f"generalist's zero-shot Dice (%; {ZERO_SHOT_CLICKS} clicks "
        "from the ground truth)", ylabel=f"Dice gain over {BASELINE} (points; {round(100 * CONFIDENCE)} % t interval "
        "over cases)", title=f"{len(args.seeds)} seed(s), {len(cases)} test phantoms, {s['iterations']} iterations")
    study.update(figure=str(figure), wall_seconds=dict(total=time.perf_counter() - start))
    _write_json(out / "study.json", study)
    atomic_write(out / "study.md", lambda tmp: tmp.write_text(study_markdown(study)))
    sources = [r["source"] for r in runs.values()]
    say(f"{len(sources)} runs ({', '.join(f'{sources.count(k)} {k}' for k in dict.fromkeys(sources))}); wrote "
        f"{out / 'study.json'}, {out / 'study.md'} and {figure}; {study['wall_seconds']['total'] / 60:.1f} min")
    return study


if __name__ == "__main__":
    run_entry(main)   # a ProjectError (StudyError included): one line `study_generalist.py: error: ...`, exit 2
