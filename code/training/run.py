"""``main(defaults, argv)``: what every ``train_LA_*.py`` entry script calls.

    defaults (the script's SETTINGS) < command-line flags -> TrainConfig -> Trainer -> fit

Also works under ``torchrun --nproc_per_node=N train_LA_*.py ...`` (DistributedDataParallel; see
``training.distributed``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional, Sequence

from training import distributed as D
from training.config import parse_config
from training.engine import Trainer
from training.outputs import RunOutput, existing_outputs
from training.timing import Timer, null_timer
from utils.errors import ProjectError, run_entry

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
    nothing). The price is memory held by fragmentation, most for UA-MT's T passes in one forward;
    ``--tune_malloc 0`` turns this off. Both measurements: results/history.md, "Numbers moved out of code
    comments". GPU runs allocate little host memory either way. Returns True if every setting was accepted.
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


def run_script(defaults: dict) -> Trainer:
    """What the ``train_LA_*.py`` scripts run: :func:`restart_with_hugepage_malloc` (``SEMISAM_NO_REEXEC=1``
    keeps the process as it is), then ``main(defaults, sys.argv[1:])`` through ``utils.errors.run_entry``: an
    error of the project (bad settings, data, checkpoint, generalist, a non-finite loss) ends the process with
    one line ``<script>.py: error: <message>`` on stderr and exit status 2."""
    restart_with_hugepage_malloc()
    return run_entry(lambda: main(defaults, sys.argv[1:]))


def main(defaults: dict, argv: Optional[Sequence[str]] = None, timer: Timer = null_timer) -> Trainer:
    """Parse ``argv`` over ``defaults``, train, return the finished ``Trainer``.

    Raises whatever stops the run: a ``ProjectError`` for bad settings, data, checkpoints, generalists or a
    non-finite loss, anything else for a bug. Settings, data, generalist and a resumed train state are all
    checked before the run folder is touched, so such a failure leaves an existing run's files as they were
    and creates none; a failure during training is appended to log.txt (``run stopped: ...``). The last good
    train_state.pth is never overwritten by a failed step.
    """
    cfg = parse_config(defaults, sys.argv[1:] if argv is None else argv)
    malloc_tuned = tune_malloc() if cfg.tune_malloc else None
    ctx = D.init_distributed(cfg.device)
    out = RunOutput(cfg, ctx.is_main)
    try:
        out.info(f"settings: {cfg.to_dict()}")
        if malloc_tuned is False:
            out.info("mallopt not available (not glibc): default malloc behaviour")
        if cfg.resume is None and existing_outputs(cfg.snapshot_path):
            out.warning(f"{cfg.snapshot_path} already holds {existing_outputs(cfg.snapshot_path)}; "
                        f"they will be overwritten")
        trainer = Trainer(cfg, ctx, out, timer)
        if cfg.resume is not None:
            trainer.load_state(trainer.state_path if cfg.resume == "auto" else cfg.resume)
        out.open_files()   # every input checked: from here on the run writes
        out.write_config({"cases": list(trainer.dataset.cases),
                          "labeled_cases": [trainer.dataset.cases[i] for i in trainer.labeled_idxs],
                          "world_size": ctx.world_size})
        trainer.fit()
        return trainer
    except ProjectError as err:
        out.failure(f"run stopped: {err}")
        raise
    except Exception as err:
        out.failure(f"run stopped: {type(err).__name__}: {err}")
        raise
    finally:
        out.close()
        D.shutdown_distributed(ctx)
