"""Tables of results for people: GitHub markdown (summary.md, benchmark reports) and plain text (terminal),
the side-by-side table of methods, the demo's summary.md and the generalist study's study.md.

Tables align the first column left (names) and the others right (numbers), so columns of figures line up.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

__all__ = ["markdown_table", "text_table", "METRICS", "side_by_side", "per_case_rows", "demo_markdown",
           "gain_cell", "study_rows", "study_markdown"]

# (key in the evaluation records, shown name, unit: '%' for fractions shown x100, None for distances)
METRICS = (("dice", "Dice", "%"), ("jaccard", "Jaccard", "%"), ("hd95", "HD95", None), ("asd", "ASD", None))


def _widths(header: Sequence, rows: Sequence[Sequence]) -> list[int]:
    return [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]


def _cells(cells: Sequence, widths: Sequence[int]) -> list[str]:
    return [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table of ``header`` and ``rows`` (cells of any type, shown with ``str``)."""
    widths = _widths(header, rows)

    def line(cells) -> str:
        return "| " + " | ".join(_cells(cells, widths)) + " |"
    # the separator row's colon right-aligns a column when rendered
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def text_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """The same table as plain text: columns two spaces apart, a rule of dashes under the header."""
    widths = _widths(header, rows)
    lines = ["  ".join(_cells(r, widths)) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cell(summary: dict, key: str, unit) -> str:
    scale = 100.0 if unit == "%" else 1.0
    return f"{scale * summary['mean'][key]:.2f} ± {scale * summary['std'][key]:.2f}"


def side_by_side(results: dict, unit: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the methods' metrics side by side: one row per metric, one 'mean ± std' column per
    method, in the order of ``results`` ({method: {'mean': {...}, 'std': {...}}}); Dice / Jaccard in %,
    distances in ``unit``."""
    header = ["metric", *results]
    rows = [[f"{name} ({u or unit})", *(_cell(r, key, u) for r in results.values())] for key, name, u in METRICS]
    return header, rows


def per_case_rows(results: dict, unit: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per test case, each method's Dice (%) then each method's HD95 (``unit``)."""
    shown = [(key, name, u) for key, name, u in METRICS if key in ("dice", "hd95")]
    header = ["case"] + [f"{m} {name} ({u or unit})" for key, name, u in shown for m in results]
    by_case = {m: {c["case"]: c for c in r["cases"]} for m, r in results.items()}
    first = next(iter(by_case.values()))
    rows = [[case] + [f"{(100 if u else 1) * by_case[m][case][key]:.2f}" for key, name, u in shown for m in results]
            for case in first]
    return header, rows


def demo_markdown(summary: dict) -> str:
    """summary.md of a demo run from its summary.json dict (demo.py documents the keys)."""
    r, unit = summary["results"], summary["distance_unit"]
    m, d, g = summary["machine"], summary["data"], summary["generalist"]
    gen = f"**{g['kind']}** `{g['path']}` ({g['action']}"
    if g.get("pretrain_iterations"):
        gen += f", {g['pretrain_arch']} pretrained for {g['pretrain_iterations']} iterations on synthetic shapes"
    gen += ")"
    verdicts = "\n\n".join(f"**{c['statement']}**" for c in summary["comparisons"])
    settings = [[k, json.dumps(v)] for k, v in summary["settings"].items()]
    times = [[k, f"{v:.1f}"] for k, v in summary["wall_seconds"].items()]
    figure = summary["figure"]
    return f"""# SemiSAM demo{' (--quick: smoke-test settings, the numbers mean nothing)' if summary['quick'] else ''}

{summary['about']}

Data: **{d['kind']}** ({d['action']}; `{d['root_path']}`). Generalist: {gen}.

{summary['generalist_quality']['zero_shot']['statement']}

Metrics: test_LA.py's protocol on {summary['n_test_cases']} test cases, last checkpoint, largest-connected-component
post-processing; mean ± std (population) over cases; distances in **{unit}**.

{markdown_table(*side_by_side(r, unit))}

{verdicts}

{figure['check']['statement']}

**{summary['verdict']}**

{markdown_table(*per_case_rows(r, unit))}

Figure: `{Path(figure['path']).name}` (image, ground truth, each method, and SAM's pseudo-label when prompted with
clicks from each method's prediction).

## Settings

The training schedule is the official one compressed to `iterations` (`lr_step`, `rampup_block`).

{markdown_table(["setting", "value"], settings)}

## Wall times

{markdown_table(["stage", "seconds"], times)}

## Machine

{m['platform']}; {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2/AVX-512 flags'}); {m['cpu_count']} CPUs
({m['usable_cores']} usable); torch {m['torch']} with {m['torch_threads']} thread(s) on {m['device']}; load average
(1, 5, 15 min) at start {summary['loadavg_start']}, at end {summary['loadavg_end']}; {m['date_utc']}.

{summary['reproducibility']}
"""


def gain_cell(gain: dict) -> str:
    """'+1.23 [-0.50, +2.96]' from ``utils.compare.seed_averaged_gain``'s dict (points); 'n/a' for the interval of
    fewer than two cases."""
    ci = (f"[{gain['ci_low']:+.2f}, {gain['ci_high']:+.2f}]" if math.isfinite(gain["half_width"])
          else "[n/a: one case]")
    return f"{gain['gain_points']:+.2f} {ci}"


def study_rows(study: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of study.md's main table: per generalist and method, its zero-shot Dice, the mean Dice
    over seeds and the gain over the baseline with its t interval (``study['rows']``: study_generalist.py)."""
    n_cases, n_seeds = study["n_test_cases"], len(study["seeds"])
    conf = round(100 * study["confidence"])
    header = ["generalist", "zero-shot Dice (%)", "method", f"Dice, mean of {n_seeds} seeds (%)",
              f"gain over {study['baseline']} (points) [{conf} % CI: t interval over {n_cases} test cases of the "
              f"paired per-case differences, each averaged over the {n_seeds} seeds]", "wins / losses (cases)"]
    rows = []
    for r in study["rows"]:
        g = r["gain"]
        rows.append([r["generalist"] or "none", "" if r["zero_shot_dice"] is None else f"{r['zero_shot_dice']:.2f}",
                     r["method"], f"{r['mean_dice']:.2f}", "" if g is None else gain_cell(g),
                     "" if g is None else f"{g['wins']} / {g['losses']}"])
    return header, rows


def study_markdown(study: dict) -> str:
    """study.md of a generalist study from its study.json dict (study_generalist.py documents the keys)."""
    s, m = study["settings"], study["machine"]
    gens = [[g["name"], f"`{g['spec']}`", g["kind"], f"{g['zero_shot']['summary']['dice_mean']:.2f}",
             f"{g['zero_shot']['summary']['dice_min']:.2f}", g["sha256"][:12]] for g in study["generalists"]]
    runs = [[r["seed"], r["generalist"] or "none", r["method"], f"{100 * r['result']['mean']['dice']:.2f}",
             "" if r.get("vs_baseline_points") is None else f"{r['vs_baseline_points']:+.2f}"]
            for r in study["runs"]]
    settings = [[k, json.dumps(v)] for k, v in s.items()]
    crop = "x".join(map(str, s["patch_size"]))
    commit = study["commit"] or "unknown (no git)"
    return f"""# Generalist study: {', '.join(study['methods'])} over {study['baseline']} against the generalist's quality{' (--quick: smoke-test settings, the numbers mean nothing)' if study['quick'] else ''}

{study['about']}

Data: {study['data']['kind']}, {s['phantom_train']} training cases ({s['labeled_num']} labeled) and {study['n_test_cases']} test cases. Seeds: {', '.join(map(str, study['seeds']))}.
Every run: the demo's recipe, {s['iterations']} iterations, evaluated with test_LA.py's protocol (last checkpoint,
largest connected component). Commit `{commit}`{' (with uncommitted changes)' if study.get('commit_dirty') else ''};
{m['date_utc']}.

## Gain over {study['baseline']}

{markdown_table(*study_rows(study))}

Zero-shot Dice: {study['zero_shot_clicks']} clicks simulated from the ground truth of each test case, in the {crop}
crop of a training patch centred on the target (the generalist alone, before any training). Gain: per test case,
the method's Dice minus {study['baseline']}'s of the same seed, averaged over the seeds; the mean over the cases
with a Student t interval over the cases (n - 1 degrees of freedom). Wins / losses: cases whose averaged
difference is above / below zero. Figure: `gain_vs_generalist.png`.

## Generalists

{markdown_table(["generalist", "spec", "kind", "zero-shot Dice (%)", "lowest case (%)", "sha256"], gens)}

## Runs

{markdown_table(["seed", "generalist", "method", "Dice (%)", f"vs {study['baseline']}, same seed (points)"], runs)}

## Settings

{markdown_table(["setting", "value"], settings)}

## Machine

{m['platform']}; {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2/AVX-512 flags'}); {m['cpu_count']} CPUs
({m['usable_cores']} usable); torch {m['torch']} with {m['torch_threads']} thread(s) on {m['device']}; wall time of
this invocation {study['wall_seconds']['total'] / 60:.1f} min (cached runs cost nothing).
"""
