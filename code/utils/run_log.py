"""Reading a run's ``log.txt`` back: the per-iteration values, the run's events, and the time it trained.

``log.txt`` (training.outputs) holds lines ``[HH:MM:SS.mmm] iteration N : name: value, name: value, ...``
plus event lines (settings, resumed, saved, stopped). A run that was stopped and resumed repeats the
iterations between its last saved state and the stop; the repeated lines are the ones the final weights came
from, so the last line of each iteration wins. The timestamps carry no date: a step back in time is a new day.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.errors import DataError

_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d(?:\.\d+)?)\] (.*)$")
_ITERATION = re.compile(r"^iteration (\d+) : (.*)$")
# a pause longer than this between two logged lines is a stopped process, not training time
MAX_STEP_GAP_S = 600.0


@dataclass
class RunLog:
    """Per-iteration values of one run.

    iterations: (N,) int, ascending, each once; values: name -> (N,) float (NaN where a line lacks the name);
    seconds: (N,) float, time since the first logged line (days counted); events: the non-iteration lines;
    resumes: how many times the run was resumed; train_seconds: summed gaps between consecutive logged lines
    shorter than ``MAX_STEP_GAP_S`` (the time the process ran, without the pauses between stop and resume).
    """
    iterations: np.ndarray
    values: dict
    seconds: np.ndarray
    events: list = field(default_factory=list)
    resumes: int = 0
    train_seconds: float = 0.0


def _parse_values(text: str) -> dict:
    out = {}
    for item in text.split(", "):
        name, sep, value = item.rpartition(": ")
        if sep:
            try:
                out[name.strip()] = float(value)
            except ValueError:
                pass
    return out


def read_run_log(path) -> RunLog:
    """Parse ``log.txt`` at ``path`` (see the module docstring); raises ValueError naming the file when it has
    no iteration line."""
    path = Path(path)
    by_iteration: dict[int, tuple[float, dict]] = {}
    events, stamps = [], []
    day, last = 0.0, None
    for raw in path.read_text(errors="replace").splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if last is not None and t + day < last:
            day += 86400.0
        t += day
        last = t
        stamps.append(t)
        body = m.group(4)
        it = _ITERATION.match(body)
        if it:
            by_iteration[int(it.group(1))] = (t, _parse_values(it.group(2)))
        else:
            events.append(body)
    if not by_iteration:
        raise DataError(f"{path}: no 'iteration N : ...' line (not a training log.txt?)")
    iterations = np.array(sorted(by_iteration), dtype=np.int64)
    names = sorted({k for _, vals in by_iteration.values() for k in vals})
    values = {n: np.array([by_iteration[i][1].get(n, np.nan) for i in iterations], dtype=np.float64)
              for n in names}
    t0 = stamps[0]
    seconds = np.array([by_iteration[i][0] - t0 for i in iterations], dtype=np.float64)
    gaps = np.diff(np.array(stamps))
    return RunLog(iterations=iterations, values=values, seconds=seconds, events=events,
                  resumes=sum(e.startswith("resumed from") for e in events),
                  train_seconds=float(gaps[(gaps >= 0) & (gaps < MAX_STEP_GAP_S)].sum()))


def write_csv(path, log: RunLog, every: int = 10) -> Path:
    """Every ``every``-th iteration (and the last one) of ``log`` as CSV: iteration, seconds, then the values."""
    path = Path(path)
    keep = (log.iterations % every == 0) | (log.iterations == log.iterations[-1])
    names = list(log.values)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "seconds"] + names)
        for j in np.flatnonzero(keep):
            w.writerow([int(log.iterations[j]), f"{log.seconds[j]:.1f}"]
                       + [repr(float(log.values[n][j])) for n in names])
    return path


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values, NaNs ignored; (N,) -> (N,)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    n = cnt[idx] - cnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[idx] - csum[lo]) / np.maximum(n, 1), np.nan)


LOSS_NAMES = ("total", "supervised", "ce", "dice", "consistency", "generalist")


def save_training_curves(path, log: RunLog, title: str = "", window: int = 50,
                         loss_names: Sequence[str] = LOSS_NAMES) -> Path:
    """A PNG of a run's health: the loss terms, the student's soft Dice on its labeled training patches
    (1 - the Dice loss), and the learning rate and loss weights, each against the iteration; noisy per-step
    values are drawn faint with their ``window``-step trailing mean on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    it = log.iterations
    ax = axes[0]
    for name in loss_names:
        if name in log.values and np.isfinite(log.values[name]).any():
            line, = ax.plot(it, log.values[name], alpha=0.15, linewidth=0.6)
            ax.plot(it, moving_average(log.values[name], window), color=line.get_color(), label=name)
    ax.set_yscale("log")
    ax.set_title("loss terms")
    ax.legend(fontsize=7)
    ax = axes[1]
    if "dice" in log.values:
        soft_dice = 1.0 - log.values["dice"]
        ax.plot(it, soft_dice, alpha=0.15, linewidth=0.6, color="C0")
        ax.plot(it, moving_average(soft_dice, window), color="C0", label=f"{window}-step mean")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    ax.set_title("student soft Dice, labeled training patches")
    ax = axes[2]
    for name, style in (("train/lr", "-"), ("weights/consistency", "--"), ("weights/generalist", ":")):
        if name in log.values and np.nanmax(np.abs(log.values[name]), initial=0.0) > 0:
            ax.plot(it, log.values[name], style, label=name)
    if "uncertainty/mask_fraction" in log.values:
        ax.plot(it, moving_average(log.values["uncertainty/mask_fraction"], window), label="UA-MT mask fraction")
    ax.set_title("learning rate, weights")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
