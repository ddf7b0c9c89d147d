"""``main(defaults, argv)``: what every ``train_LA_*.py`` entry script calls.

    defaults (the script's SETTINGS) < command-line flags -> TrainConfig -> Trainer -> fit

Also works under ``torchrun --nproc_per_node=N train_LA_*.py ...`` (DistributedDataParallel; see
``training.distributed``). Before any work: torch's thread count (``--threads``; default the idle cores),
the glibc malloc tuning (``--tune_malloc``; default auto, :func:`malloc_choice`), both stated in log.txt.
Exit statuses: 0 done, 2 a ``ProjectError`` (one line on stderr), 130 / 143 stopped by SIGINT / SIGTERM with
a resumable state (``training.interrupt``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Callable, Optional, Sequence

from training import distributed as D
from training.config import parse_config, resolve_default_paths
from training.engine import Trainer
from training.interrupt import StopRequests, TrainingInterrupted, resume_command
from training.outputs import RunOutput, check_run_folder, move_aside
from training.timing import Timer, null_timer
from utils.errors import ProjectError, run_entry
from utils.runtime import apply_threads, mem_available_bytes, peak_rss_bytes

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def tune_malloc(mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 2**31 - 1,
                disable_mmap: bool = True) -> bool:
    """Make glibc keep and reuse freed memory (a no-op returning False without glibc's mallopt).

    A training step allocates and frees the same large activation buffers every iteration. By default glibc
    serves blocks above a (dynamic) threshold with fresh mmap'ed pages and unmaps them on free, and trims the
    heap top back to the OS, so each step pays again for page faults and zero-filling. Raising the trim and
    mmap thresholds keeps blocks up to 32 MiB in the heap; V-Net activations are larger (16 x 112x112x80
    float32 = 64 MiB per sample), so ``disable_mmap`` (M_MMAP_MAX = 0) also serves those from the heap.
    On CPU this made a V-Net step markedly faster (only with disable_mmap; the thresholds alone gained
    nothing). The price is memory held by fragmentation, most for UA-MT's T passes in one forward, so
    runs peaked above the official code's: ``--tune_malloc auto`` (the default) applies it only where the
    machine's available memory leaves room (:func:`malloc_choice`), ``1`` / ``0`` force it. Both
    measurements: results/history.md, "Numbers moved out of code comments". GPU runs allocate little host memory either way. Returns True if every setting was accepted.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):   # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = [(_M_MMAP_THRESHOLD, int(mmap_threshold)), (_M_TRIM_THRESHOLD, int(trim_threshold))]
    if disable_mmap:
        settings.append((_M_MMAP_MAX, 0))
    return all(mallopt(param, value) == 1 for param, value in settings)


_HUGETLB = "glibc.malloc.hugetlb=1"
_REEXEC_GUARD = "SEMISAM_NO_REEXEC"


def hugepage_malloc_env(environ: dict) -> Optional[dict]:
    """The environment to restart with so that glibc's malloc backs large blocks with transparent huge pages
    (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), or None to keep this one: not Linux, the tunable already
    chosen (either way), or ``SEMISAM_NO_REEXEC`` set (also set in the returned environment, so a restarted
    process never restarts again). Huge pages made a 128^3 V-Net forward + backward on CPU faster with either
    ``--tune_malloc`` setting (results/history.md, "Second pass", "What remains, by file"). The tunable is
    only read when a process starts, hence the restart; glibc versions without it ignore it."""
    if not sys.platform.startswith("linux") or environ.get(_REEXEC_GUARD):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, _HUGETLB) if t), **{_REEXEC_GUARD: "1"})


def restart_with_hugepage_malloc() -> None:
    """Replace this process by the same command under :func:`hugepage_malloc_env` (same PID, so torchrun
    and job schedulers keep tracking it); returns without doing anything when that is None."""
    env = hugepage_malloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), env)


# --tune_malloc auto: after the first training step (untuned), on when the memory available then is at least this
# multiple of the process's peak so far: the tuning's extra hold measured up to about the untuned peak (UA-MT 8.9
# vs 5.7 GiB, SemiSAM 15.4 vs 14.5 GiB; results/history.md), so what it keeps cannot be what pushes a run past
# the machine's memory; a simple rule, stated in log.txt
MALLOC_AUTO_HEADROOM = 1.0


def malloc_choice(setting: Optional[bool]) -> tuple[Optional[bool], str]:
    """(tune glibc malloc now?, why) for ``--tune_malloc`` 1 / 0 / auto (None). Auto returns (None, why): it is
    decided after the first training step by :func:`malloc_auto_decision`, which needs that step's peak."""
    if setting is not None:
        return bool(setting), f"--tune_malloc {int(bool(setting))}"
    return None, "--tune_malloc auto: decided after the first training step"


def malloc_auto_decision(peak: Optional[int], available: Optional[int], processes: int = 1) -> tuple[bool, str]:
    """``--tune_malloc auto``: (tune?, why) from the process's peak resident memory after its first training
    step (``peak`` bytes, VmHWM) and the machine's available memory then (``available``, MemAvailable): on when
    ``available >= MALLOC_AUTO_HEADROOM * peak * processes`` (``processes``: the training processes sharing this
    machine's memory, e.g. torchrun's local world size), off where either is unknown. The tuning keeps freed
    memory, so a run peaks higher than without it; this makes sure the machine has room for that."""
    if peak is None or available is None:
        return False, "--tune_malloc auto: peak or available memory unknown, off"
    on = available >= MALLOC_AUTO_HEADROOM * peak * processes
    share = f" per process ({processes} on this machine)" if processes > 1 else ""
    return on, (f"--tune_malloc auto: {available / 2**30:.1f} GiB available {'>=' if on else '<'} "
                f"{MALLOC_AUTO_HEADROOM:g} x the {peak / 2**30:.1f} GiB peak of the first step{share}")


def apply_malloc_auto(say: Callable[[str], None], processes: int = 1) -> bool:
    """Decide ``--tune_malloc auto`` now (:func:`malloc_auto_decision` on this process's peak, the machine's
    available memory and the ``processes`` training on it), tune if on, say the outcome; returns whether malloc
    is tuned."""
    on, why = malloc_auto_decision(peak_rss_bytes(), mem_available_bytes(), processes)
    tuned = tune_malloc() if on else False
    if on and not tuned:
        say(f"glibc malloc tuning asked for ({why}) but mallopt is not available (not glibc): default behaviour")
    else:
        say(f"glibc malloc tuning {'on' if on else 'off'} from here ({why})")
    return bool(tuned)


def run_script(defaults: dict) -> Trainer:
    """What the ``train_LA_*.py`` scripts run: :func:`restart_with_hugepage_malloc` (``SEMISAM_NO_REEXEC=1``
    keeps the process as it is), then ``main(defaults, sys.argv[1:])`` through ``utils.errors.run_entry``: an
    error of the project (bad settings, data, checkpoint, generalist, a non-finite loss) ends the process with
    one line ``<script>.py: error: <message>`` on stderr and exit status 2. A run stopped by SIGINT or SIGTERM
    (``training.interrupt``) exits with status 128 + the signal number (130, 143) and no traceback, after
    logging where its resumable state is and the command that continues it."""
    restart_with_hugepage_malloc()
    defaults = resolve_default_paths(defaults)     # the script's paths are relative to code/, not to the cwd
    try:
        return run_entry(lambda: main(defaults, sys.argv[1:]))
    except TrainingInterrupted as stop:
        sys.stdout.flush()
        raise SystemExit(stop.exit_status) from None


def main(defaults: dict, argv: Optional[Sequence[str]] = None, timer: Timer = null_timer,
         program: Optional[str] = None, resume_hint: Optional[str] = None) -> Trainer:
    """Parse ``argv`` over ``defaults``, train, return the finished ``Trainer``.

    Raises whatever stops the run: a ``ProjectError`` for bad settings, data, checkpoints, generalists or a
    non-finite loss, ``training.interrupt.TrainingInterrupted`` for SIGINT / SIGTERM, anything else for a bug.
    Settings, the run folder (another run's files need --resume or --overwrite; it must be writable), data,
    validation cases, generalists, the bf16 probes and a resumed train state are all checked before the run
    folder is touched, so such a failure leaves an existing run's files as they were and creates none; a
    failure during training is appended to log.txt (``run stopped: ...``). The last good train_state.pth is
    never overwritten by a failed step. ``program`` (default ``sys.argv[0]``) names the script in the resume
    command an interrupted run logs; a caller that is not such a script (demo.py, study_generalist.py) gives
    ``resume_hint``, what its user should do instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(defaults, argv)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    _, threads_line = apply_threads(cfg.threads, share=local_world)    # before any tensor work
    to_move = check_run_folder(cfg)     # read-only: every rank refuses alike
    malloc_on, malloc_why = malloc_choice(cfg.tune_malloc)
    malloc_tuned = tune_malloc() if malloc_on else None
    ctx = D.init_distributed(cfg.device)
    out = RunOutput(cfg, ctx.is_main)
    stop = StopRequests(allow_second=not ctx.enabled)
    try:
        with stop.installed():
            out.info(f"settings: {cfg.to_dict()}")
            out.info(threads_line)
            if malloc_tuned is False:
                out.info(f"glibc malloc tuning asked for ({malloc_why}) but mallopt is not available (not glibc): "
                         f"default malloc behaviour")
            elif malloc_on is None:
                out.info(f"glibc malloc tuning {malloc_why}")
            else:
                out.info(f"glibc malloc tuning {'on' if malloc_on else 'off'} ({malloc_why})")
            trainer = Trainer(cfg, ctx, out, timer)
            if cfg.resume is not None:
                trainer.load_state(trainer.state_path if cfg.resume == "auto" else cfg.resume)
            moved = move_aside(cfg.snapshot_path, to_move) if ctx.is_main else None   # every input checked
            out.open_files()   # from here on the run writes
            if moved is not None:
                names = ", ".join(p.name for p in sorted(moved.iterdir()))
                out.info(f"--overwrite: the previous run's files ({names}) moved to {moved}")
            out.write_config({"cases": list(trainer.dataset.cases),
                              "labeled_cases": [trainer.dataset.cases[i] for i in trainer.labeled_idxs],
                              "world_size": ctx.world_size})
            decide_malloc = (lambda: apply_malloc_auto(out.info, local_world)) if malloc_on is None else None
            trainer.fit(stop, after_first_step=decide_malloc)
        return trainer
    except TrainingInterrupted as err:
        hint = resume_hint or f"continue with: {resume_command(argv, program, ctx.world_size)}"
        if err.saved:
            out.warning(f"interrupted by {err.signal_name} at iteration {err.iteration}: resumable state saved "
                        f"to {err.state_path}; {hint}")
        elif err.iteration is not None:
            out.warning(f"interrupted by a second {err.signal_name} during iteration {err.iteration + 1}: "
                        + (f"the last resumable state is {err.state_path}; {hint}" if err.state_path is not None
                           else "no train state had been saved yet"))
        else:
            out.warning(f"interrupted by {err.signal_name} before training started: no train state was saved")
        raise
    except ProjectError as err:
        out.failure(f"run stopped: {err}")
        raise
    except Exception as err:
        out.failure(f"run stopped: {type(err).__name__}: {err}")
        raise
    finally:
        out.close()
        D.shutdown_distributed(ctx)
