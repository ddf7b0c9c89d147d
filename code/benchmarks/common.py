"""Shared helpers of the benchmarks: data location, timing, memory peaks, statistics, number formats,
worker subprocesses and random-weight SAM-Med3D generalists. (Device choice, autocast and the machine
description come from ``utils.runtime``, tables from ``utils.report``, Dice from ``utils.metrics``: the same
helpers the training and test scripts use.)

Every benchmark is a script run from ``code/`` (``python benchmarks/bench_step.py ...``) or as a module
(``python -m benchmarks.bench_step ...``); both put ``code/`` on ``sys.path`` so the project's top-level
packages (``training``, ``networks``, ...) import as they do for the training scripts.

Timing conventions: wall-clock ``time.perf_counter``; on CUDA every timed region is bracketed by
``torch.cuda.synchronize`` so asynchronous kernels are charged to the region that launched them.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

CODE_DIR = Path(__file__).resolve().parents[1]
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))

import torch  # noqa: E402  (after the sys.path fix, like every project import below)

from dataloaders.layout import TRAINING_FOLDER  # noqa: E402
from utils.io import atomic_save  # noqa: E402

LA_ENV = "LA_DATA_ROOT"


class BenchmarkError(ValueError):
    """Unusable benchmark settings (the message names the setting and what was expected)."""


# ------------------------------------------------------------------------------------------------ data
def resolve_case_dir(root_path: Optional[str]) -> Path:
    """The folder of LA case folders, from ``root_path`` or the ``LA_DATA_ROOT`` environment variable.

    Accepts the dataset root (holding ``2018LA_Seg_Training Set/`` and ``train.list``) or the case folder
    itself (whose parent holds the lists, UA-MT's layout). Raises ``FileNotFoundError`` naming the path.
    """
    where = "--root_path"
    if not root_path:
        root_path = os.environ.get(LA_ENV)
        where = LA_ENV
    if not root_path:
        raise FileNotFoundError(f"no LA data given: pass --root_path <LA root>, set {LA_ENV}, or use --synthetic "
                                f"(phantom volumes in the LA layout)")
    path = Path(root_path).expanduser()
    case_dir = path / TRAINING_FOLDER if (path / TRAINING_FOLDER).is_dir() else path
    if not case_dir.is_dir() or not (case_dir.parent / "train.list").is_file():
        raise FileNotFoundError(f"{where}={root_path}: expected the LA root holding '{TRAINING_FOLDER}/' and "
                                f"train.list (or that case folder itself), found no such layout")
    return case_dir


def make_synthetic_data(folder: Path, n_train: int = 6, n_test: int = 1, seed: int = 0) -> Path:
    """Write LA-sized phantom cases (``dataloaders.phantoms``) into ``folder``; returns the case folder.

    Used with ``--synthetic`` where the real data is absent (e.g. a GPU machine without network); the
    volumes have the LA crop size (190, 140, 88), so patches and inference windows cost what they cost
    on the real scans.
    """
    from dataloaders.phantoms import write_phantom_dataset
    write_phantom_dataset(folder, n_train=n_train, n_test=n_test, seed=seed)
    return Path(folder) / TRAINING_FOLDER


def add_data_args(p, synthetic_help: str = "LA-sized phantom volumes instead of the LA data") -> None:
    """--root_path / --synthetic, as every benchmark reads them (``data_case_dir``)."""
    p.add_argument("--root_path", default=None, help="LA root or its case folder (default: $LA_DATA_ROOT)")
    p.add_argument("--synthetic", action="store_true", help=synthetic_help)


def add_json_arg(p) -> None:
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def check_counts(steps: int, warmup: int, batch: int = 1) -> None:
    """Refuse timed-call counts that would measure nothing."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise BenchmarkError(f"need --steps >= 1, --warmup >= 0, --batch >= 1; got {steps}, {warmup}, {batch}")


def data_case_dir(root_path: Optional[str], synthetic: bool, scratch: Path) -> tuple[Path, str]:
    """(case folder, description) for ``--root_path`` / ``LA_DATA_ROOT`` or ``--synthetic`` phantoms."""
    if synthetic:
        return make_synthetic_data(scratch / "phantoms"), "synthetic phantoms (dataloaders.phantoms, seed 0)"
    case_dir = resolve_case_dir(root_path)
    return case_dir, f"LA data at {case_dir.parent}"


# --------------------------------------------------------------------------------------------- runtime
def setup_runtime(threads: Optional[int], tune_malloc: Optional[bool] = True) -> int:
    """Apply the glibc malloc options as the training scripts do (``training.run.tune_malloc``; None: their
    'auto' rule, decided after the first step: ``training.run.apply_malloc_auto``) and the torch thread count;
    returns the number of threads."""
    from training.run import malloc_choice, tune_malloc as apply_malloc_options
    if malloc_choice(tune_malloc)[0]:
        apply_malloc_options()
    if threads is not None:
        if threads < 1:
            raise BenchmarkError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def interleaved(calls: dict, device: torch.device, warmup: int, steps: int,
                progress: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """Time several zero-argument callables alternately.

    Each gets ``warmup`` untimed calls, then ``steps`` rounds call every one once in turn (order reversed
    every other round), so a drifting load of a shared machine affects all alike. Returns
    ``({name: {'wall': spread, 'cpu': spread}}, {name: output of its last call})``; 'cpu' is this process's
    CPU time (all threads), less disturbed by other processes than wall-clock time.
    """
    outputs = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            outputs[name] = fn()
    wall: dict = {n: [] for n in calls}
    cpu: dict = {n: [] for n in calls}
    names = list(calls)
    for rnd in range(steps):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            if progress:
                progress(f"{name} ({rnd + 1}/{steps})")
            cpu_start = time.process_time()
            seconds, outputs[name] = timed(calls[name], device)
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(seconds)
    return {n: {"wall": spread(wall[n]), "cpu": spread(cpu[n])} for n in names}, outputs


def amp_dtype(name: str) -> Optional[torch.dtype]:
    """'none' | 'fp32' -> None (float32), 'bf16' -> torch.bfloat16."""
    table = {"none": None, "fp32": None, "bf16": torch.bfloat16}
    if name not in table:
        raise BenchmarkError(f"precision {name!r} unknown; choose from {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------- memory
def fault_counters() -> tuple[int, int]:
    """(minor page faults, involuntary context switches) of this process so far (getrusage; zeros elsewhere)."""
    try:
        import resource
    except ImportError:         # not on POSIX
        return 0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_minflt), int(usage.ru_nivcsw)


def process_peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (``getrusage`` ru_maxrss; KiB on Linux)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS record (Linux ``/proc/self/clear_refs`` = 5); True if it worked.

    After this, :func:`peak_rss_since_reset` measures only what follows (e.g. the timed steps), while
    :func:`process_peak_rss` read *before* the reset keeps the peak of the set-up phase.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset() -> Optional[int]:
    """Peak RSS (``VmHWM``) since :func:`reset_peak_rss`, bytes; None off Linux."""
    from utils.runtime import peak_rss_bytes
    return peak_rss_bytes()


def gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else n / 2**30


# ----------------------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict:
    """{'median', 'min', 'max', 'n'} of ``values`` (seconds or any unit)."""
    if not values:
        raise BenchmarkError("no measurements to summarise")
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


# ------------------------------------------------------------------------------------ SAM generalists
def randomize_zero_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Fill the parameters SAM-Med3D initialises to zero (absolute and relative position tables) with
    N(0, std^2) so that every path of a random-weight model carries non-trivial numbers (with zero
    tables the relative-position terms, whose cost we time, would add exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed") or ".rel_pos_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def random_sam(arch: str = "vit_b_ori", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised SAM-Med3D (registry name or JSON config path), eval mode, frozen.

    Random weights time exactly like trained ones (same shapes, same kernels); the pseudo-labels they
    produce are meaningless, which the reports say.
    """
    from networks.sam_med3d import GeneralistCheckpointError, arch_to_config, build_sam3d_from_config
    torch.manual_seed(seed)
    try:
        config = arch_to_config(arch)
    except GeneralistCheckpointError as err:
        raise BenchmarkError(f"generalist arch {arch!r} is neither a registry name nor a JSON config file: "
                             f"{err}") from None
    model = build_sam3d_from_config(config)
    randomize_zero_init(model, seed)
    return model.eval().requires_grad_(False)


def random_generalist_checkpoint(folder: Path, arch: str, seed: int) -> Path:
    """Save a random-weight SAM-Med3D (``random_sam(arch, seed)``) as a state-dict file in ``folder`` and
    return its path, so the training engine loads it through ``load_generalist`` like a real checkpoint.
    Reuses an existing file of the same (arch, seed)."""
    name = f"random_{Path(arch).stem}_seed{seed}.pth"
    path = Path(folder) / name
    if not path.is_file():
        atomic_save(random_sam(arch, seed).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------ workers
def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def run_worker(script: Path, spec: dict, scratch: Path, tag: str, timeout: Optional[float] = None,
               threads: Optional[int] = None) -> dict:
    """Run ``python script --_worker SPEC`` in a fresh process (its own memory peak) and return the JSON
    it wrote to ``spec['out']``. Raises ``RuntimeError`` with the worker's stderr tail on failure."""
    spec = dict(spec, out=str(scratch / f"{tag}.result.json"))
    spec_path = scratch / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if threads is not None:
        # OpenMP pools of every library in the worker get the same size as torch's intra-op pool
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(script), "--_worker", str(spec_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(CODE_DIR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0 or not Path(spec["out"]).is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"benchmark worker {tag!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(Path(spec["out"]).read_text())


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------ number formats
def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s >= 1 else f"{1e3 * s:.1f} ms"


def fmt_spread(d: Optional[dict]) -> str:
    """'median [min, max]' of a :func:`spread` dict of seconds."""
    if not d:
        return "-"
    return f"{fmt_seconds(d['median'])} [{fmt_seconds(d['min'])}, {fmt_seconds(d['max'])}]"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_gib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"
