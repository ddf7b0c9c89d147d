"""What a run writes under ``<model_dir>/<exp>/``: log.txt, TensorBoard events (``log/``), config.json, the
progress bar. Only the main rank writes; on other ranks every method is a no-op.

Nothing is written before :meth:`RunOutput.open_files`: the entry point calls it once the settings, the run
folder (:func:`check_run_folder`: another run's files need ``--resume`` or ``--overwrite``, which moves them
to ``previous_<UTC time>/``; the folder must be writable), the data, the generalist and a resumed train state
have been checked, so a run refused for bad input leaves an existing run folder as it was. Lines logged before
go to the console at once and into log.txt when it opens.

log.txt gets one line per ``log_every`` iterations (UA-MT logs every iteration) plus run events; the console
shows the run events and the progress (``utils.progress.Progress``: a tqdm bar on a terminal, else a plain
line with iteration, loss, elapsed time and ETA every 5 % of the run or 30 s) instead of the per-iteration
lines.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from training.config import TrainConfig, write_config_json
from utils.errors import ConfigError
from utils.progress import Progress

ITERATION_LEVEL = 15          # between DEBUG and INFO: file only
LOGGER_NAME = "semisam.train"


class _Pending(logging.Handler):
    """Holds the file's records until log.txt is opened (then replayed into it, with their own timestamps)."""

    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


class _TqdmHandler(logging.Handler):
    """Console handler that prints above the progress bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never crash training
            self.handleError(record)


def _summary_writer_class():
    """tensorboardX's SummaryWriter (the pinned requirement), else torch's own (needs the tensorboard package,
    e.g. on images without tensorboardX), else None. Imported lazily: only the main rank writes events."""
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        return None


def _middle_slice(vol: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) -> float (X, Y) in [0, 1], the middle z slice (min-max scaled)."""
    s = vol[..., vol.shape[-1] // 2].detach().float().cpu()
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)


class RunOutput:
    """Files and console of one run (main rank), silent elsewhere. Files are opened by :meth:`open_files`
    (by the entry point after its checks, else at the start of ``Trainer.fit``).

    Attributes: snapshot (Path), logger (logging.Logger), writer (tensorboardX SummaryWriter or None).
    """

    def __init__(self, cfg: TrainConfig, is_main: bool = True):
        self.cfg = cfg
        self.is_main = is_main
        self.snapshot = cfg.snapshot_path
        self.logger = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(ITERATION_LEVEL)
        self.writer = None
        self._progress: Optional[Progress] = None
        self._handlers: list[logging.Handler] = []
        self._pending: Optional[_Pending] = None
        self.files_open = False
        if not is_main:
            self.logger.addHandler(logging.NullHandler())
            return
        self._format = logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
        console = _TqdmHandler()
        console.setLevel(logging.INFO)
        console.addFilter(_not_file_only)
        self._pending = _Pending(ITERATION_LEVEL)
        for h in (self._pending, console):
            h.setFormatter(self._format)
            self.logger.addHandler(h)
            self._handlers.append(h)

    def open_files(self) -> None:
        """Create the run folder, open log.txt (appending; the lines logged so far first) and the TensorBoard
        writer. Idempotent; a no-op on other ranks."""
        if not self.is_main or self.files_open:
            return
        self.files_open = True
        self.snapshot.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.snapshot / "log.txt")
        file_handler.setLevel(ITERATION_LEVEL)
        file_handler.setFormatter(self._format)
        for record in self._pending.records:
            file_handler.handle(record)
        self._drop_pending()
        self.logger.addHandler(file_handler)
        self._handlers.append(file_handler)
        writer_cls = _summary_writer_class()
        if writer_cls is None:
            self.logger.warning("neither tensorboardX nor torch.utils.tensorboard (package tensorboard) is "
                                "installed: no TensorBoard events are written")
        else:
            self.writer = writer_cls(str(self.snapshot / "log"))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self.logger.removeHandler(self._pending)
            self._handlers.remove(self._pending)
            self._pending = None

    # ------------------------------------------------------------------------------------- text
    def info(self, msg: str) -> None:
        self.logger.info(msg)

    def warning(self, msg: str) -> None:
        self.logger.warning(msg)

    def error(self, msg: str) -> None:
        self.logger.error(msg)

    def failure(self, msg: str) -> None:
        """Why the run stopped, for log.txt only (if it is open): the entry point reports it on stderr."""
        self.logger.error(msg, extra={"file_only": True})

    def iteration_line(self, msg: str) -> None:
        self.logger.log(ITERATION_LEVEL, msg)

    def write_config(self, extra: dict) -> None:
        if self.is_main:
            self.open_files()
            write_config_json(self.cfg, self.snapshot / "config.json", extra)

    # ------------------------------------------------------------------------------- TensorBoard
    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def images(self, visuals: dict[str, torch.Tensor], step: int) -> None:
        """visuals: name -> (X, Y, Z) volume; the middle z slice is written as a grey image."""
        if self.writer is None:
            return
        for name, vol in visuals.items():
            self.writer.add_image(name, _middle_slice(vol).numpy(), step, dataformats="HW")

    # ---------------------------------------------------------------------------------- progress
    def start_progress(self, initial: int, total: int) -> None:
        """Show progress from iteration ``initial`` to ``total`` (``cfg.progress``; main rank only)."""
        if self.is_main and self.cfg.progress:
            self._progress = Progress(total, desc=f"train {self.cfg.exp}", initial=initial)

    def advance(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(loss=loss)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._drop_pending()   # never opened: the run wrote nothing, and its early lines stay unwritten
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers.clear()


# ------------------------------------------------------------------------------ another run's files
RUN_FILES = ("train_state.pth", "best_model.pth", "config.json", "log.txt", "log")   # 'log': TensorBoard events
PREVIOUS_PREFIX = "previous_"


def run_files(snapshot: Path) -> list[Path]:
    """What a run writes that is already in ``snapshot``: train_state.pth, iter_N.pth, best_model.pth,
    config.json, log.txt, the TensorBoard folder log/ and unfinished atomic writes; other entries (folders
    of other experiments nested under this one, earlier ``previous_*`` folders) are not a run's files."""
    if not snapshot.is_dir():
        return []
    return sorted(p for p in snapshot.iterdir()
                  if p.name in RUN_FILES or (p.name.startswith("iter_") and p.suffix == ".pth")
                  or p.name.startswith(".train_state.pth.tmp"))


def _names(files: list[Path], limit: int = 6) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in files]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_run_folder(cfg: TrainConfig) -> list[Path]:
    """Refuse (``ConfigError``) to start a run that would replace another run's files or cannot write its
    folder; returns the files ``--overwrite`` will move aside. Writes nothing.

    A folder holding a run's files needs ``--resume`` (continue it) or ``--overwrite`` (start afresh, the old
    files moved to ``previous_<UTC time>/``). ``--resume <state>`` of a run elsewhere may not continue into a
    folder that holds yet another run's files."""
    snapshot = cfg.snapshot_path
    _check_writable(snapshot)
    found = run_files(snapshot)
    if not found:
        return []
    if cfg.resume is None and not cfg.overwrite:
        aside = snapshot / f"{PREVIOUS_PREFIX}<UTC time>"
        raise ConfigError(f"{snapshot} already holds a run ({_names(found)}); pass --resume to continue it, "
                          f"--overwrite to start afresh (its files move to {aside}/), or choose another --exp / "
                          f"--model_dir")
    if cfg.resume not in (None, "auto") and Path(cfg.resume).resolve().parent != snapshot.resolve():
        raise ConfigError(f"--resume {cfg.resume} would continue that run in {snapshot}, which holds another "
                          f"run ({_names(found)}); choose another --exp / --model_dir")
    return found if cfg.overwrite else []


def _check_writable(folder: Path) -> None:
    """``folder``, or the nearest existing folder above it (where it would be created), must be a writable
    folder; raises ConfigError naming the culprit. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create the run folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run folder {folder}: {existing} is not writable by this user; "
                          f"choose another --model_dir")


def move_aside(snapshot: Path, files: list[Path]) -> Optional[Path]:
    """Move ``files`` into ``<snapshot>/previous_<UTC time>/`` (renames within the folder: nothing is copied
    or deleted); returns that folder (None when ``files`` is empty)."""
    if not files:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = snapshot / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while target.exists():             # two --overwrite runs within one second
        n += 1
        target = snapshot / f"{PREVIOUS_PREFIX}{stamp}_{n}"
    target.mkdir()
    for p in files:
        p.rename(target / p.name)
    return target
