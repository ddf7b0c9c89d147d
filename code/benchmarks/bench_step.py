"""Time one training step of any method through the real training engine, section by section.

    python benchmarks/bench_step.py --method semisam --root_path ../data --steps 3 --warmup 1
    python benchmarks/bench_step.py --compare mt uamt semisam mt:amp=bf16 --json ../results/step.json
    python benchmarks/bench_step.py --method semisam --patch_size 128 128 128 --device cuda --amp bf16

What is timed: the loop of ``Trainer.fit`` without its logging and checkpointing, i.e. per step
``batch = next(loader)`` (section ``data``) then ``Trainer.train_step(batch)``; the Trainer is built from
the same ``TrainConfig`` the ``train_LA_*.py`` scripts build (their method settings are read from the scripts
themselves, see ``METHOD_SCRIPTS``), with real LA patches (``--root_path`` or ``LA_DATA_ROOT``) or LA-sized
phantoms (``--synthetic``). Sections come from the engine's timer plug-in (``training.timing.SectionTimer``:
data, student_forward, loss, teacher, uncertainty, generalist, backward, optimizer, ema); the engine passes
the same timer to the generalist branch, which splits the generalist further (``utils.generalist.TIMER_SECTIONS``:
each SAM-Med3D's image encoder, prompt encoder and mask decoder calls, ``generalist.encoder`` etc., and its
simulated clicks, ``generalist.first_click``: connected components and the exact distance transform on the
CPU; ``generalist.clicks``: the later, random ones); ``generalist.other``
is the rest (normalisation, padding or resampling, thresholds, the pseudo-label's statistics).
``other`` is the step time outside every section (lr/weights, the host sync of the loss scalars, stats).

Every flag the benchmark does not know is a training flag (``python train_LA_mt.py -h``): --patch_size,
--batch_size, --labeled_bs, --n_filters, --num_clicks, --prompt, --generalist_arch, --generalist, --amp,
--device, --uamt_passes, --num_workers, ... Defaults are the training defaults (112x112x80, batch 4 with 2
labeled, n_filters 16, fp32) except ``num_workers`` = 0, so ``data`` is the full loading cost of a batch
(with workers it would be the wait for one). Without ``--generalist``, generalist methods load RANDOM-weight
SAM-Med3D checkpoints of ``--generalist_arch`` (default vit_b_ori) written to a scratch folder: they time
like trained weights, but their pseudo-labels are meaningless.

Each configuration runs in its own subprocess so its peak memory is its own: ``peak_rss_process`` is the
process peak (ru_maxrss, including model building and checkpoint loading), ``peak_rss_steps`` the peak
during the timed steps only (Linux clear_refs/VmHWM); on CUDA also torch.cuda.max_memory_allocated.
Statistics are the median and the min/max over ``--steps`` steps after ``--warmup`` steps, pooled over
``--rounds`` (each round runs every configuration once more, in fresh processes, the order reversed every
other round). Every section is measured in wall-clock time and in this process's CPU time; the ratios to
the first configuration are given three ways: wall-clock medians, CPU-time medians (less disturbed by other
processes on a shared machine), and "within process" (step time / the time of the sections a base
configuration also has, measured in the same steps; the base is the first configuration doing the same
shared work at the same settings, e.g. mt:amp=bf16 for uamt:amp=bf16).
On a loaded machine prefer ``--threads 1``: with more threads every OpenMP barrier waits for descheduled
threads, which inflates small kernels (optimizer, EMA) many times over.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402

from utils.report import markdown_table  # noqa: E402
from utils.runtime import loadavg, machine_info, resolve_device  # noqa: E402

# method -> the entry script whose module constants (SPECIALIST, GENERALIST_TERM, PROMPT, ...) define it
METHOD_SCRIPTS = {
    "sup": "train_LA_sup",
    "mt": "train_LA_mt",
    "uamt": "train_LA_uamt",
    "semisam": "train_LA_semisam_mt",
    "semisam_plus": "train_LA_semisam_plus",
}
# script constant -> TrainConfig field; PATCH_SIZE is deliberately not taken, so every method of a
# comparison runs at the same patch (pass --patch_size 128 128 128 for the SemiSAM scripts' patch)
PRESET_CONSTANTS = {"LABELED_NUM": "labeled_num", "SPECIALIST": "specialist", "GENERALIST_TERM": "generalist_term",
                    "GENERALIST_ARCH": "generalist_arch", "PROMPT": "prompt", "NUM_CLICKS": "num_clicks",
                    "SAM_WEIGHT": "sam_weight"}
RANDOM_GENERALIST = "<random>"
SYNTHETIC_LABELED = 2          # phantom data has 6 training cases: 2 labeled, 4 unlabeled
SECTION_ORDER = ("data", "student_forward", "loss", "teacher", "uncertainty", "generalist", "generalist.encoder",
                 "generalist.prompt_encoder", "generalist.decoder", "generalist.first_click",
                 "generalist.clicks", "generalist.other", "backward", "optimizer",
                 "ema", "other")


# ------------------------------------------------------------------------------------------ settings
def method_preset(method: str) -> tuple[dict, int]:
    """(TrainConfig settings, number of generalist checkpoints) of ``method``, read from its entry script."""
    if method not in METHOD_SCRIPTS:
        raise C.BenchmarkError(f"method {method!r} unknown; choose from {sorted(METHOD_SCRIPTS)}")
    module = importlib.import_module(METHOD_SCRIPTS[method])
    settings = {field: getattr(module, const) for const, field in PRESET_CONSTANTS.items() if hasattr(module, const)}
    return settings, len(getattr(module, "GENERALIST", []))


def check_enough_cases(case_dir: Path) -> tuple[int, int]:
    """(training, test) case counts of the LA root of ``case_dir``; a BenchmarkError unless every method's
    script setting can run on it (more training cases than the largest LABELED_NUM, one test case)."""
    from dataloaders.la_heart import read_list
    n_train = len(read_list(case_dir.parent / "train.list"))
    test_list = case_dir.parent / "test.list"
    n_test = len(read_list(test_list)) if test_list.is_file() else 0
    labeled = max(method_preset(m)[0].get("labeled_num", 1) for m in METHOD_SCRIPTS)
    if n_train <= labeled or n_test < 1:
        raise C.BenchmarkError(f"{case_dir.parent}: {n_train} training and {n_test} test cases; the method "
                               f"scripts label up to {labeled} cases, so at least {labeled + 1} training cases "
                               f"and 1 test case are needed")
    return n_train, n_test


def parse_entry(entry: str) -> tuple[str, list[str]]:
    """'METHOD[:key=value[:key=value...]]' -> (method, training flags); commas split multi-value flags,
    e.g. ``semisam:patch_size=128,128,128:amp=bf16``."""
    method, *overrides = entry.split(":")
    argv: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise C.BenchmarkError(f"compare entry {entry!r}: expected METHOD[:key=value...], got {item!r}")
        argv += [f"--{key}", *value.split(",")]
    method_preset(method)   # validates the name
    return method, argv


def build_config(method: str, train_argv: Sequence[str], case_dir: Path, scratch: Path, synthetic: bool):
    """The validated ``TrainConfig`` of one benchmark configuration (random generalists written on demand)."""
    from training.config import parse_config
    settings, n_generalists = method_preset(method)
    defaults = dict(settings, root_path=str(case_dir), num_workers=0, progress=False,
                    model_dir=str(scratch / "model"), exp=f"bench_{method}")
    if synthetic:
        defaults["labeled_num"] = SYNTHETIC_LABELED
    if n_generalists:
        defaults["generalist"] = [RANDOM_GENERALIST] * n_generalists
    cfg = parse_config(defaults, list(train_argv))
    if cfg.generalist_term == "none":
        generalist_weights = "none"
    elif all(g == RANDOM_GENERALIST for g in cfg.generalist):
        cfg.generalist = [str(C.random_generalist_checkpoint(scratch / "ckpt", cfg.generalist_arch, seed))
                          for seed in range(len(cfg.generalist))]
        generalist_weights = f"random (seeds 0..{len(cfg.generalist) - 1})"
    else:
        generalist_weights = "checkpoints: " + ", ".join(cfg.generalist)
    return cfg, generalist_weights


# ------------------------------------------------------------------------------------------ worker
def _derived_sections(total: float, sections: dict) -> dict:
    """Add 'generalist.other' (generalist minus its timed parts) and 'other' (step minus top sections)."""
    from training.timing import SECTIONS
    out = dict(sections)
    if "generalist" in out:
        parts = sum(v for k, v in out.items() if k.startswith("generalist."))
        out["generalist.other"] = out["generalist"] - parts
    out["other"] = total - sum(v for k, v in sections.items() if k in SECTIONS)
    return out


class WallCpuTimer:
    """The engine's timer plug-in measuring each section twice: wall-clock (``SectionTimer``, CUDA-synchronised)
    and this process's CPU time (``time.process_time``, all threads), which a loaded shared machine disturbs
    less than wall-clock time (other processes' time slices are not counted; spinning OpenMP threads are)."""

    def __init__(self, device: torch.device):
        from training.timing import SectionTimer
        self.wall = SectionTimer(synchronize=device.type == "cuda", device=device)
        self.cpu = SectionTimer(clock=time.process_time)

    @contextlib.contextmanager
    def __call__(self, name: str):
        with self.cpu(name), self.wall(name):
            yield

    def reset(self) -> None:
        self.wall.reset()
        self.cpu.reset()

    def totals(self) -> tuple[dict, dict]:
        return ({k: v["total_s"] for k, v in self.wall.summary().items()},
                {k: v["total_s"] for k, v in self.cpu.summary().items()})


def run_config(spec: dict) -> dict:
    """Build the Trainer of ``spec['config']`` and time ``warmup + steps`` steps in this process.

    Returns the raw measurements of this run (one round); :func:`summarize` turns rounds into statistics.
    """
    from training.config import config_from_dict
    from training.engine import Trainer
    from training.outputs import RunOutput

    cfg = config_from_dict(spec["config"]).validate()
    threads = C.setup_runtime(spec.get("threads"), cfg.tune_malloc)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = WallCpuTimer(device)
    build_s, trainer = C.timed(lambda: Trainer(cfg, output=RunOutput(cfg, is_main=False), timer=timer), device)
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    load_before = loadavg()
    batches = iter(trainer.make_loader())
    records, peak_setup, cuda_setup, reset_ok, malloc_auto = [], None, None, False, None
    try:
        for i in range(warmup + steps):
            if i == warmup:
                peak_setup = C.process_peak_rss()
                reset_ok = C.reset_peak_rss()
                if device.type == "cuda":
                    cuda_setup = torch.cuda.max_memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
            timer.reset()
            C.synchronize(device)
            usage = C.fault_counters()
            start, start_cpu = time.perf_counter(), time.process_time()
            with timer("data"):
                batch = next(batches)
            result = trainer.train_step(batch)
            C.synchronize(device)
            total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i == 0 and cfg.tune_malloc is None:   # the training scripts' auto rule, after the same first step
                from training.run import apply_malloc_auto
                malloc_auto = apply_malloc_auto(lambda msg: None)
            if i >= warmup:
                wall, cpu = timer.totals()
                faults, preempted = (after - before for after, before in zip(C.fault_counters(), usage))
                records.append({"total": total, "sections": _derived_sections(total, wall),
                                "cpu_total": total_cpu, "cpu_sections": _derived_sections(total_cpu, cpu),
                                "loss": result.loss, "minor_faults": faults, "involuntary_switches": preempted})
    finally:
        del batches
    peak_steps = C.peak_rss_since_reset() if reset_ok else None
    memory = {"peak_rss_process": max(v for v in (peak_setup, peak_steps, C.process_peak_rss()) if v is not None),
              "peak_rss_steps": peak_steps}
    if device.type == "cuda":
        steps_alloc = torch.cuda.max_memory_allocated(device)
        memory.update(cuda_peak_allocated_steps=steps_alloc, cuda_peak_allocated=max(cuda_setup or 0, steps_alloc),
                      cuda_peak_reserved_steps=torch.cuda.max_memory_reserved(device))
    return {
        "label": spec["label"], "method": spec["method"],
        "settings": {k: cfg.to_dict()[k] for k in (
            "patch_size", "batch_size", "labeled_bs", "n_filters", "specialist", "generalist_term", "prompt",
            "num_clicks", "generalist_arch", "geometry", "uamt_passes", "uamt_reuse_target", "amp", "channels_last",
            "checkpoint_levels", "deterministic", "num_workers", "cache", "labeled_num", "tune_malloc")},
        "generalist_weights": spec["generalist_weights"],
        "device": str(device), "threads": threads, "build_s": build_s,
        "malloc_tuned_after_first_step": malloc_auto,     # --tune_malloc auto's decision (None: not auto)
        "per_step": records, "memory": memory,
        "loadavg": [load_before, loadavg()],
        "machine": machine_info(device),
    }


def summarize(rounds: list[dict]) -> dict:
    """Merge the raw runs (rounds) of one configuration: step and section spreads over all timed steps,
    wall-clock and CPU time; memory peaks are the maxima over the rounds."""
    first = rounds[0]
    steps = [r for run in rounds for r in run["per_step"]]
    names = [n for n in SECTION_ORDER if any(n in r["sections"] for r in steps)]
    memory = {k: max((run["memory"].get(k) or 0) for run in rounds) or None for k in first["memory"]}
    out = {k: first[k] for k in ("label", "method", "settings", "generalist_weights", "device", "threads", "machine")}
    out["malloc_tuned_after_first_step"] = [run.get("malloc_tuned_after_first_step") for run in rounds]
    out.update(
        rounds=len(rounds), build_s=[run["build_s"] for run in rounds],
        step=C.spread([r["total"] for r in steps]),
        sections={n: C.spread([r["sections"].get(n, 0.0) for r in steps]) for n in names},
        cpu_step=C.spread([r["cpu_total"] for r in steps]),
        cpu_sections={n: C.spread([r["cpu_sections"].get(n, 0.0) for r in steps]) for n in names},
        minor_faults=C.spread([r.get("minor_faults", 0) for r in steps]),
        involuntary_switches=C.spread([r.get("involuntary_switches", 0) for r in steps]),
        losses=[r["loss"] for r in steps], per_step=steps, memory=memory,
        loadavg=[run["loadavg"] for run in rounds])
    return out


COMPARABLE = ("patch_size", "batch_size", "labeled_bs", "n_filters", "amp", "channels_last", "checkpoint_levels",
              "num_workers", "cache", "tune_malloc")


def _comparable(result: dict, base: dict) -> bool:
    """``result`` does at least ``base``'s work at the same settings (``COMPARABLE``)."""
    same = all(result["settings"].get(k) == base["settings"].get(k) for k in COMPARABLE)
    return same and {n for n in base["sections"] if "." not in n} <= set(result["sections"])


def within_process_ratio(result: dict, base: dict, clock: str = "wall") -> Optional[float]:
    """Median over ``result``'s steps of step time / time of the sections ``base`` also has.

    Under a varying machine load, the extra sections (e.g. 'uncertainty', 'generalist') are compared with
    the shared ones (forward, teacher, backward, ...) measured in the same steps, so the ratio does not
    depend on when each configuration ran. Only defined when ``result`` does the base's work at the same
    settings (same patch, batch, precision, ...; see ``COMPARABLE``); None otherwise.
    """
    if not _comparable(result, base):
        return None
    key_total, key_sections = ("total", "sections") if clock == "wall" else ("cpu_total", "cpu_sections")
    shared = set(base["sections"])
    ratios = []
    for step in result["per_step"]:
        extra = sum(v for n, v in step[key_sections].items()
                    if n not in shared and "." not in n and n != "other")
        ratios.append(step[key_total] / (step[key_total] - extra))
    return C.spread(ratios)["median"]


# ------------------------------------------------------------------------------------------ report
def _settings_cell(s: dict) -> str:
    layout = {None: "auto", True: "cl", False: "contig"}[s.get("channels_last")]
    return (f"{'x'.join(map(str, s['patch_size']))}, {s['batch_size']}/{s['labeled_bs']}, {s['n_filters']}, "
            f"{s['amp']}, {layout}, ckpt {s.get('checkpoint_levels', 0)}")


def ratios(results: list[dict]) -> dict:
    """Per configuration, its step time relative to the first configuration's: 'wall' and 'cpu' (medians);
    and 'within_process' (:func:`within_process_ratio`, wall-clock) relative to 'within_base', the first
    configuration it is comparable with (e.g. uamt:amp=bf16 to mt:amp=bf16; itself if no other is)."""
    first = results[0]
    out = {}
    for r in results:
        base = next(b for b in results if _comparable(r, b))
        out[r["label"]] = {"wall": r["step"]["median"] / first["step"]["median"],
                           "cpu": r["cpu_step"]["median"] / first["cpu_step"]["median"],
                           "within_process": within_process_ratio(r, base), "within_base": base["label"]}
    return out


def _within_cell(rel: dict) -> str:
    return f"{C.fmt_ratio(rel['within_process'])} ({rel['within_base']})"


def _load_cell(r: dict) -> str:
    pairs = [f"{a[0]:.1f}/{b[0]:.1f}" for a, b in r["loadavg"] if a and b]
    return ", ".join(pairs) or "-"


def summary_table(results: list[dict]) -> str:
    """Markdown: sections (median wall time and share of the step median) x configurations, then totals."""
    header = ["section"] + [r["label"] for r in results]
    rows = []
    names = [n for n in SECTION_ORDER if any(n in r["sections"] for r in results)]
    for name in names:
        row = [("  " if "." in name else "") + name]
        for r in results:
            s = r["sections"].get(name)
            row.append("-" if s is None else
                       f"{C.fmt_seconds(s['median'])} ({100 * s['median'] / r['step']['median']:.0f}%)")
        rows.append(row)
    rel = ratios(results)
    base = results[0]["label"]
    rows += [
        ["step median [min, max]"] + [C.fmt_spread(r["step"]) for r in results],
        ["step CPU time median"] + [C.fmt_seconds(r["cpu_step"]["median"]) for r in results],
        [f"ratio to {base}: wall"] + [C.fmt_ratio(rel[r["label"]]["wall"]) for r in results],
        [f"ratio to {base}: CPU time"] + [C.fmt_ratio(rel[r["label"]]["cpu"]) for r in results],
        ["ratio within process (to)"] + [_within_cell(rel[r["label"]]) for r in results],
        ["peak RSS (process)"] + [C.fmt_gib(r["memory"]["peak_rss_process"]) for r in results],
        ["peak RSS (steps)"] + [C.fmt_gib(r["memory"].get("peak_rss_steps")) for r in results],
        # page faults after the warm-up mean fresh memory every step (allocator churn); involuntary context
        # switches mean other processes took our cores (a shared machine)
        ["page faults / preemptions per step (median)"] + [
            f"{r['minor_faults']['median']:.0f} / {r['involuntary_switches']['median']:.0f}" for r in results],
    ]
    if any("cuda_peak_allocated" in r["memory"] for r in results):
        rows.append(["CUDA peak allocated"] + [C.fmt_gib(r["memory"].get("cuda_peak_allocated")) for r in results])
    rows += [
        ["load avg before/after"] + [_load_cell(r) for r in results],
        ["patch, batch/labeled, filters, amp, layout, ckpt levels"] + [_settings_cell(r["settings"]) for r in results],
        ["generalist weights"] + [r["generalist_weights"] for r in results],
    ]
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--method", default="mt", help=f"one of {sorted(METHOD_SCRIPTS)} (default mt)")
    what.add_argument("--compare", nargs="+", metavar="ENTRY",
                      help="several configurations, each METHOD[:key=value...] (training flags without '--', "
                           "commas for several values), e.g. mt uamt semisam mt:amp=bf16; ratios are to the first")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed warm-up steps first (default 2: with the malloc options the process's memory "
                        "still grows during the second step at 128^3 on CPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole comparison this many times (fresh processes, order reversed every other "
                        "round) and pool the steps: spreads each configuration over time on a shared machine")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    C.add_data_args(p)
    C.add_json_arg(p)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per configuration")
    p.add_argument("--in_process", action="store_true",
                   help="run the configurations in this process (faster start; memory peaks are then cumulative)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, train_argv = build_parser().parse_known_args(argv)
    if args._worker:
        spec = json.loads(Path(args._worker).read_text())
        Path(spec["out"]).write_text(json.dumps(run_config(spec)))
        return {}
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise C.BenchmarkError(f"need --steps >= 1, --warmup >= 0 and --rounds >= 1, got {args.steps}, "
                               f"{args.warmup} and {args.rounds}")
    entries = args.compare or [args.method]
    if len(set(entries)) != len(entries):
        raise C.BenchmarkError(f"--compare entries must differ, got {entries}")
    parsed = [parse_entry(e) for e in entries]
    with C.scratch_dir("bench_step_") as tmp:
        scratch = Path(tmp)
        case_dir, data_desc = C.data_case_dir(args.root_path, args.synthetic, scratch)
        specs = []
        for entry, (method, extra) in zip(entries, parsed):
            cfg, weights = build_config(method, [*train_argv, *extra], case_dir, scratch, args.synthetic)
            specs.append({"label": entry, "method": method, "config": cfg.to_dict(), "generalist_weights": weights,
                          "steps": args.steps, "warmup": args.warmup, "threads": args.threads})
        raw: dict[str, list] = {spec["label"]: [] for spec in specs}
        for rnd in range(args.rounds):
            for i, spec in enumerate(specs if rnd % 2 == 0 else specs[::-1]):
                print(f"[round {rnd + 1}/{args.rounds}, {i + 1}/{len(specs)}] {spec['label']}: {args.warmup} "
                      f"warm-up + {args.steps} timed steps ...", file=sys.stderr, flush=True)
                if args.in_process:
                    run = run_config(spec)
                else:
                    run = C.run_worker(Path(__file__), spec, scratch, f"r{rnd}c{i}", args.timeout, args.threads)
                raw[spec["label"]].append(run)
    results = [summarize(raw[spec["label"]]) for spec in specs]
    payload = {"benchmark": "train_step", "data": data_desc, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds, "train_argv": list(train_argv),
               "machine": machine_info(resolve_device(results[0]["device"])),
               "results": results, "ratios_to_first": ratios(results)}
    print(f"\ntraining step ({data_desc}; {args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed "
          f"steps; {results[0]['threads']} threads on {results[0]['device']})")
    print(summary_table(results))
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    # the same process environment as the training scripts (glibc huge-page malloc); workers inherit it
    from training.run import restart_with_hugepage_malloc
    restart_with_hugepage_malloc()
    main()
