"""Progress of a long loop: a tqdm bar on a terminal, plain periodic lines anywhere else.

    progress = Progress(total=300, desc="train MT")       # initial=k when resuming at step k
    for ...:
        progress.update(loss=0.41)                         # one step done; values shown as `name value`
    progress.close()

A tqdm bar redraws one line with carriage returns: in a pipe, a CI log or ``make demo | tee`` that is either
nothing readable or, when bars are switched off there, silence for the whole stage. So the bar is drawn only
when both stdout and stderr are terminals; otherwise a line such as

    [train MT] 45/300 (15%)  loss 0.4123  elapsed 0:00:41  ETA 0:03:52

goes to stdout every ``every_fraction`` of the total or every ``every_seconds``, whichever comes first, and
after the last step.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "on_terminal", "format_seconds"]


def _now() -> float:
    return time.perf_counter()


def on_terminal() -> bool:
    """True when stdout and stderr are both terminals (where a redrawn bar reads as one line)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` of a duration (rounded down to whole seconds)."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Steps ``initial..total`` of one stage, shown as a bar (terminal) or as lines (``stream``, default stdout).

    Args:
        total: steps of the whole stage (a resumed stage still counts from 0 to total).
        desc: the stage's name, in front of every line.
        initial: steps already done (elapsed time and ETA count only the steps of this call).
        enabled: False shows nothing.
        bar: True / False forces the tqdm bar / lines; None (default) draws a bar only :func:`on_terminal`.
        every_fraction, every_seconds: a line at least every that share of ``total`` or that many seconds.
        stream: where lines go (default sys.stdout at each line, so a captured stdout sees them).
    """

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, bar: Optional[bool] = None,
                 every_fraction: float = 0.05, every_seconds: float = 30.0, stream: Optional[TextIO] = None):
        self.total, self.desc, self.n, self.initial = int(total), desc, int(initial), int(initial)
        self.enabled = enabled
        self.every_steps = max(1, int(round(self.total * every_fraction)))
        self.every_seconds = every_seconds
        self.stream = stream
        self.start = self.last_line = _now()
        self._bar = None
        if enabled and (on_terminal() if bar is None else bar):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit="it", dynamic_ncols=True,
                             file=sys.stderr)

    def update(self, **values: float) -> None:
        """One step done; ``values`` (e.g. loss=0.41) are shown beside it."""
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            if values:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            self._bar.update(1)
            return
        now = _now()
        if self.n % self.every_steps == 0 or self.n >= self.total or now - self.last_line >= self.every_seconds:
            self.last_line = now
            print(self.line(now, values), file=self.stream or sys.stdout, flush=True)

    def line(self, now: float, values: dict) -> str:
        """``[desc] n/total (p%)  name value ...  elapsed H:MM:SS  ETA H:MM:SS``."""
        elapsed = now - self.start
        done = self.n - self.initial
        eta = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
        shown = "".join(f"  {k} {v:.4g}" for k, v in values.items())
        return (f"[{self.desc}] {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%){shown}  "
                f"elapsed {format_seconds(elapsed)}  ETA {format_seconds(eta) if done > 0 else '?'}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
