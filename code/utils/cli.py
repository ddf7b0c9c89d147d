"""What every entry script's command line shares: the help format and the ``--threads`` flag.

``-h`` shows each flag's default: argparse's ArgumentDefaultsHelpFormatter appends it only to flags that have
help text, so every flag of every script has some; scripts whose description is a usage example keep its
line breaks (RawDescriptionHelpFormatter).
"""
from __future__ import annotations

import argparse

THREADS_HELP = "torch CPU threads (0: the cores left idle by the current load, as /proc/loadavg reports it)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for every flag with help text; the description printed as written."""


def add_window_flags(parser: argparse.ArgumentParser, stride_xy: int = 18, stride_z: int = 4,
                     default_window: tuple = (112, 112, 80)) -> None:
    """The sliding-window evaluation flags of predict.py and test.py: --patch_size (default: the training patch
    from config.json beside the checkpoint), --stride_xy, --stride_z, --amp, --device."""
    a = parser.add_argument
    a("--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
      help=f"window (default: the training patch from config.json beside the checkpoint, else "
           f"{' '.join(map(str, default_window))})")
    a("--stride_xy", type=int, default=stride_xy, help="sliding-window stride along X and Y")
    a("--stride_z", type=int, default=stride_z, help="sliding-window stride along Z")
    a("--amp", choices=("none", "bf16"), default="none", help="autocast dtype of the forward passes")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def apply_runtime_flags(args: argparse.Namespace):
    """``--threads``, ``--device`` and ``--amp`` of an evaluation script: sets the thread count, resolves the
    device and refuses ``--amp bf16`` where it would be emulated; returns the torch device."""
    from utils.bf16 import require_native_bf16
    from utils.runtime import resolve_device
    apply_threads_flag(args.threads)
    device = resolve_device(args.device)
    if args.amp == "bf16":
        require_native_bf16(device)
    return device


def add_threads_flag(parser: argparse.ArgumentParser, default: int = 0) -> None:
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP)


def apply_threads_flag(threads: int) -> int:
    """Set torch's thread count from ``--threads`` and say so on stdout (before any tensor work); returns it."""
    from utils.runtime import apply_threads     # here: scripts that never need torch do not import it for -h
    n, line = apply_threads(threads)
    print(line, flush=True)
    return n
