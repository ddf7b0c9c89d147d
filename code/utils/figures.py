"""Figures for reports: segmentations (axial slices with mask overlays) and a method's gain against a
generalist's quality (study_generalist.py).

    save_segmentation_figure(path, [FigureCase(name, image, reference, panels=[FigurePanel(title, mask), ...])])

draws, for each case and each chosen axial slice (constant Z), one row: the image alone, the reference
(ground truth) filled, then every panel's mask filled with the reference's outline on top, so misses and false
positives read at a glance. Arrays are (X, Y, Z) as stored in the h5 / NIfTI files; a slice is shown with X
horizontal and Y vertical. A panel may carry a ``box`` (the region a model looked at, e.g. the crop given to
SAM), drawn dashed on the slices that cut it. ``save_gain_figure(path, points)`` plots gains with their
confidence intervals against the generalists' zero-shot Dice, one series per method.

Only matplotlib's object API with the Agg canvas is used (no pyplot), so it never needs a display and never
touches a global backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["FigurePanel", "FigureCase", "pick_slices", "save_segmentation_figure", "comparison_case",
           "save_gain_figure"]

_FILL = ("#e6550d", "#3182bd", "#31a354", "#756bb1", "#de2d26", "#636363")
_REFERENCE_FILL = "#fdd835"
_REFERENCE_LINE = "#fdd835"


@dataclass
class FigurePanel:
    """One mask column. mask: (X, Y, Z) {0,1}; box: optional ((x0, x1), (y0, y1), (z0, z1)) half-open."""
    title: str
    mask: np.ndarray
    box: Optional[tuple] = None


@dataclass
class FigureCase:
    """One case: image (X, Y, Z) float, reference mask (X, Y, Z) {0,1}, panels to compare with it."""
    name: str
    image: np.ndarray
    reference: np.ndarray
    panels: list = field(default_factory=list)



def _save(fig, path, dpi: int) -> Path:
    """Lay out ``fig`` and write it to ``path`` (its folder created); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

def pick_slices(reference: np.ndarray, n: int) -> list[int]:
    """``n`` axial (Z) indices spread evenly over the reference's foreground extent (between 20 % and 80 %
    of it, where the structure is large), or over the whole volume when the reference is empty."""
    if n < 1:
        raise ValueError(f"pick_slices: n must be >= 1, got {n}")
    reference = np.asarray(reference)
    if reference.ndim != 3:
        raise ValueError(f"pick_slices: reference must be (X, Y, Z), got shape {reference.shape}")
    zs = np.flatnonzero(reference.reshape(-1, reference.shape[2]).any(axis=0))
    lo, hi = (int(zs[0]), int(zs[-1])) if len(zs) else (0, reference.shape[2] - 1)
    if n == 1:
        return [(lo + hi) // 2]
    fractions = np.linspace(0.2, 0.8, n)
    return sorted({int(round(lo + f * (hi - lo))) for f in fractions})


def _check_case(case: FigureCase) -> None:
    shape = np.shape(case.image)
    if len(shape) != 3:
        raise ValueError(f"case {case.name}: image must be (X, Y, Z), got shape {shape}")
    if np.shape(case.reference) != shape:
        raise ValueError(f"case {case.name}: reference shape {np.shape(case.reference)} != image shape {shape}")
    for p in case.panels:
        if np.shape(p.mask) != shape:
            raise ValueError(f"case {case.name}, panel {p.title!r}: mask shape {np.shape(p.mask)} != image "
                             f"shape {shape}")


def _overlay(ax, mask2d: np.ndarray, color: str, alpha: float = 0.45) -> None:
    from matplotlib.colors import ListedColormap
    if mask2d.any():
        ax.imshow(np.ma.masked_where(~mask2d.T, mask2d.T), cmap=ListedColormap([color]), alpha=alpha,
                  origin="lower", interpolation="nearest", vmin=0, vmax=1)


def _outline(ax, mask2d: np.ndarray, color: str) -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.T.astype(float), levels=[0.5], colors=[color], linewidths=0.8, origin="lower")


def _box(ax, box, z: int) -> None:
    from matplotlib.patches import Rectangle
    (x0, x1), (y0, y1), (z0, z1) = box
    if z0 <= z < z1:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                               linestyle="--", linewidth=0.8))


def save_segmentation_figure(path, cases: Sequence[FigureCase], n_slices: int = 3, title: Optional[str] = None,
                             panel_size: float = 2.2, dpi: int = 110) -> Path:
    """Write a PNG: for every case, ``n_slices`` rows (see :func:`pick_slices`) x (2 + len(panels)) columns.

    Returns the written path. Raises ValueError when a case's arrays disagree in shape (naming the case and
    panel) or when there is nothing to draw.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cases = list(cases)
    if not cases:
        raise ValueError("save_segmentation_figure: no case to draw")
    for case in cases:
        _check_case(case)
    n_cols = 2 + max(len(c.panels) for c in cases)
    rows = [(case, z) for case in cases for z in pick_slices(case.reference, n_slices)]
    fig = Figure(figsize=(panel_size * n_cols, panel_size * len(rows) + (0.5 if title else 0.1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (case, z) in enumerate(rows):
        image = np.asarray(case.image, dtype=np.float32)[:, :, z]
        lo, hi = np.percentile(image, [1, 99])
        reference = np.asarray(case.reference)[:, :, z] > 0
        columns = [("image", None, None), ("ground truth", reference, None)]
        columns += [(p.title, np.asarray(p.mask)[:, :, z] > 0, p) for p in case.panels]
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(columns):
                ax.axis("off")
                continue
            name, mask2d, panel = columns[c]
            ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if c == 1:
                _overlay(ax, mask2d, _REFERENCE_FILL)
            elif c >= 2:
                _overlay(ax, mask2d, _FILL[(c - 2) % len(_FILL)])
                _outline(ax, reference, _REFERENCE_LINE)
                if panel.box is not None:
                    _box(ax, panel.box, z)
            if r == 0 or rows[r - 1][0] is not case:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{case.name}\nz={z}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def comparison_case(name: str, image: np.ndarray, reference: np.ndarray, predictions: dict,
                    generalist_notes: Sequence[dict]) -> FigureCase:
    """A case comparing methods and the generalist prompted from each: one panel per method (its Dice in the
    title), then one per ``generalist_notes`` entry (``utils.compare.generalist_check``: the generalist's mask
    and crop box, its Dice inside the crop and the prompting method's there)."""
    from utils.metrics import binary_dice
    panels = [FigurePanel(f"{m}  Dice {binary_dice(p, reference):.2f}", p) for m, p in predictions.items()]
    panels += [FigurePanel(f"SAM \u2190 {n['prompted_by']} clicks\ncrop Dice {n['sam_dice_in_crop']:.2f} "
                           f"({n['prompted_by']} {n['prompt_dice_in_crop']:.2f})", n["mask"], n["box"])
               for n in generalist_notes]
    return FigureCase(name, image, reference, panels)


def save_gain_figure(path, points: Sequence[dict], title: Optional[str] = None, xlabel: str = "",
                     ylabel: str = "", dpi: int = 110) -> Path:
    """Write a PNG of gains against a quality: one series per ``method``, each point at (``x``, ``gain``) with a
    bar from ``low`` to ``high`` (none where they are not finite) and its ``label`` beside it, and a dashed line
    at no gain. ``points``: dicts with method, label, x, gain, low, high. Series are shifted sideways by a
    little so that bars at the same ``x`` stay apart. Returns the written path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = list(points)
    if not points:
        raise ValueError("save_gain_figure: no point to draw")
    methods = list(dict.fromkeys(p["method"] for p in points))
    xs = [float(p["x"]) for p in points]
    span = max(max(xs) - min(xs), 10.0)
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.axhline(0.0, color="#636363", linestyle="--", linewidth=0.8)
    for i, method in enumerate(methods):
        shift = (i - (len(methods) - 1) / 2) * 0.012 * span
        mine = [p for p in points if p["method"] == method]
        color = _FILL[i % len(_FILL)]
        x = np.array([float(p["x"]) + shift for p in mine])
        y = np.array([float(p["gain"]) for p in mine])
        lo = np.array([float(p["low"]) for p in mine])
        hi = np.array([float(p["high"]) for p in mine])
        finite = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(x[finite], y[finite], yerr=[y[finite] - lo[finite], hi[finite] - y[finite]], fmt="none",
                    ecolor=color, elinewidth=1.2, capsize=4)
        ax.plot(x, y, "o", color=color, label=method)
        for p, xi, yi in zip(mine, x, y):
            ax.annotate(str(p["label"]), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)
