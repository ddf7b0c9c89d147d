"""Ctrl-C (SIGINT) and SIGTERM during training: stop at the next iteration boundary with a resumable state.

A signal that arrives while the loop runs only sets a flag; ``Trainer.fit`` checks it after each iteration
(every rank together under torchrun, so all stop at the same iteration and take part in the state's
collective save), writes train_state.pth (atomically: ``utils.io.atomic_save``), and raises
:class:`TrainingInterrupted`. The entry point logs where the state is and the command that resumes it, and
exits with status 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
its signal stopped, without a traceback.

A second signal before that (a user who does not want to wait for the iteration to end) stops at once;
train_state.pth is then the last one written, whole, since every write replaces the file in one rename.
Under torchrun a second signal is ignored: torchrun forwards the terminal's SIGINT to the ranks, and a rank
that stopped at once would leave the others waiting in the collective save. Before training starts (while
data and generalists load), a signal stops at once: there is nothing to save yet.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal. A KeyboardInterrupt, so library code that cleans up on Ctrl-C (DataLoader
    workers) does so, and ``except Exception`` blocks do not swallow it.

    Attributes: signum, iteration (completed steps; None before training started), state_path (the resumable
    state written at that iteration, or None when nothing was saved)."""

    def __init__(self, signum: int, iteration: Optional[int] = None, state_path: Optional[Path] = None,
                 saved: bool = False):
        self.signum, self.iteration, self.state_path, self.saved = signum, iteration, state_path, saved
        super().__init__(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """128 + the signal number: what a shell reports for a process stopped by that signal."""
        return 128 + int(self.signum)


class StopRequests:
    """The signal handlers of one run. ``requested`` is the signal number received (None: none yet).

    Use ``with stop.installed():`` around the whole run and ``with stop.deferring():`` around the training
    loop; handlers are only installed in the main thread (Python allows no other)."""

    def __init__(self, allow_second: bool = True):
        self.requested: Optional[int] = None
        self.allow_second = allow_second
        self._deferred = False

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
            if not self._deferred:
                raise TrainingInterrupted(signum)
            sys.stderr.write(f"\n{signal.Signals(signum).name} received: saving a resumable state at the end of this "
                             f"iteration" + (" (a second signal stops at once)" if self.allow_second else "") + "\n")
            sys.stderr.flush()
        elif self.allow_second:
            raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferring(self) -> Iterator["StopRequests"]:
        """Signals only set ``requested`` inside (the loop stops at its next iteration boundary)."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and a worker that
    died of it would make the main process's next batch fail before it can save; the main process stops the
    workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _python() -> str:
    """'python' when that is this interpreter on the PATH, else this interpreter's full path."""
    found = shutil.which("python")
    if found and os.path.realpath(found) == os.path.realpath(sys.executable):
        return "python"
    return sys.executable


def resume_command(argv: Sequence[str], program: Optional[str] = None, world_size: int = 1) -> str:
    """The command that continues a run started as ``program argv``: the same flags without ``--resume``
    (and its value) and ``--overwrite``, then ``--resume`` (the run folder's train_state.pth)."""
    args, items, i = [], list(argv), 0
    while i < len(items):
        a = items[i]
        if a in ("--resume", "--overwrite"):
            if i + 1 < len(items) and not items[i + 1].startswith("-"):
                i += 1      # its value
        elif not (a.startswith("--resume=") or a.startswith("--overwrite=")):
            args.append(a)
        i += 1
    launcher = [f"torchrun --nproc_per_node={world_size}"] if world_size > 1 else [_python()]
    return " ".join(launcher + [shlex.join([program or sys.argv[0], *args, "--resume"])])
