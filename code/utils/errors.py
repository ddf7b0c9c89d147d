"""The project's own errors, and how an entry script reports them.

An error the user can fix (a bad setting, data file, checkpoint or generalist) is a :class:`ProjectError`;
its message names the culprit (the flag, case, file or key) and what was expected. Every entry script calls
its ``main`` through :func:`run_entry`, which turns such an error into one line on stderr,
``<script>.py: error: <message>``, and exit status 2 (argparse's own format and status for bad flags), with
no traceback. Any other exception is a bug: it propagates with its traceback.

Each subclass also derives from the builtin exception the code raised before this module existed, so
callers (and tests) that catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

__all__ = ["ProjectError", "ConfigError", "DataError", "MissingFileError", "CheckpointError", "GeneralistError",
           "one_line", "run_entry"]


class ProjectError(Exception):
    """An error the user can fix: bad configuration, data, checkpoint or generalist."""


class ConfigError(ProjectError, ValueError):
    """A setting (flag, script default) or a combination of settings that cannot work."""


class DataError(ProjectError, ValueError):
    """A missing or malformed data folder, case list, case file or case content."""


class MissingFileError(ProjectError, FileNotFoundError):
    """A file the user named (or a default path) does not exist."""


class CheckpointError(ProjectError, ValueError):
    """A checkpoint or train-state file that cannot be read or does not fit the model or run."""


class GeneralistError(ProjectError, ValueError):
    """A generalist (SAM-Med3D) checkpoint or architecture that cannot be loaded."""


def one_line(message: str) -> str:
    """``message`` with its line breaks (and the blanks around them) collapsed into single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(message).strip())


def run_entry(main: Callable[[], T], prog: Optional[str] = None,
              errors: tuple[type[BaseException], ...] = (ProjectError,)) -> T:
    """Call ``main()`` as a command-line entry point and return its result.

    An exception of ``errors`` (default: any :class:`ProjectError`) prints ``<prog>: error: <message>`` as one
    line on stderr and raises ``SystemExit(2)``; ``prog`` defaults to the script's file name, as argparse's.
    Every other exception propagates unchanged, traceback included.
    """
    try:
        return main()
    except errors as err:
        name = prog or os.path.basename(sys.argv[0]) or "python"
        message = one_line(str(err)) or type(err).__name__
        sys.stdout.flush()   # whatever the run printed comes before the error line on a shared terminal
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
