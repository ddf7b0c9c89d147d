"""Section timers for ``Trainer.train_step``.

The engine wraps each part of a step in ``with self.timer(name):``. Section names (``SECTIONS``):
data, student_forward, loss, teacher, uncertainty, generalist, backward, optimizer, ema.

``null_timer`` (the default) costs one function call per section. ``SectionTimer`` accumulates wall-clock
seconds per section; with ``synchronize=True`` it calls ``torch.cuda.synchronize`` on entry and exit so
asynchronous CUDA work is charged to the section that launched it (use it for benchmarks only: the
synchronisation itself slows training).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, ContextManager, Optional

import torch

SECTIONS = ("data", "student_forward", "loss", "teacher", "uncertainty", "generalist", "backward", "optimizer",
            "ema")

Timer = Callable[[str], ContextManager]

_NULL = contextlib.nullcontext()


def null_timer(name: str) -> ContextManager:
    """A timer that measures nothing."""
    return _NULL


class SectionTimer:
    """Accumulate seconds and call counts per section name; callable as ``timer(name)``.

    Args:
        synchronize: call ``torch.cuda.synchronize(device)`` around each section (CUDA benchmarks).
        device: the CUDA device to synchronise (default: current).
        clock: time source (tests inject a fake clock).
    """

    def __init__(self, synchronize: bool = False, device: Optional[torch.device] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.synchronize = synchronize and torch.cuda.is_available()
        self.device = device
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = self.clock()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += self.clock() - start
            self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """{section: {'total_s', 'count', 'mean_ms'}} in ``SECTIONS`` order, then any other names."""
        names = [n for n in SECTIONS if n in self.totals] + sorted(set(self.totals) - set(SECTIONS))
        return {n: {"total_s": self.totals[n], "count": self.counts[n],
                    "mean_ms": 1e3 * self.totals[n] / max(self.counts[n], 1)} for n in names}
