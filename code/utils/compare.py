"""Comparing trained methods on one test set: evaluate each checkpoint, pair their per-case scores, and check
what a generalist adds when prompted from each method's predictions.

    results = {name: evaluate_checkpoint(ckpt, root, cases, ...) for name, ckpt in checkpoints.items()}
    verdict = paired_comparison(results["MT"], results["SemiSAM"], "MT", "SemiSAM")
    notes = generalist_check(branch, image, gt, {name: prediction}, size, device)   # one test case
    scores = ground_truth_click_scores(branch, root, cases, size, device)  # the generalist's own quality
    check = check_generalist(branch, root, {name: {case: prediction}}, size, device, "MT", n_figure)  # all kept
    gain = seed_averaged_gain([mt_seed1, mt_seed2], [semisam_seed1, semisam_seed2])   # over seeds, with a CI

Used by the demo (one seed) and study_generalist.py (several seeds and generalists: :func:`seed_averaged_gain`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from utils.errors import ProjectError
from utils.inference import evaluate, load_specialist
from utils.metrics import binary_dice

__all__ = ["METRIC_KEYS", "ComparisonError", "summarize_cases", "evaluate_checkpoint", "paired_comparison", "crop_box",
           "pseudo_label_in_crop", "generalist_check", "generalist_verdict", "check_generalist",
           "ground_truth_click_scores", "corpus_click_scores", "summarize_scores", "t_interval", "seed_averaged_gain"]

METRIC_KEYS = ("dice", "jaccard", "hd95", "asd")


class ComparisonError(ProjectError, ValueError):
    """Results that cannot be compared (e.g. evaluated on different cases)."""


def summarize_cases(records: Sequence[dict]) -> dict:
    """Mean and population std (ddof 0) of each metric over per-case records: {'mean': {...}, 'std': {...}}."""
    values = {m: np.array([r[m] for r in records], dtype=np.float64) for m in METRIC_KEYS}
    return {"mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std()) for m, v in values.items()}}


def evaluate_checkpoint(checkpoint, base_dir, cases: Sequence[str], *, patch_size, stride_xy: int, stride_z: int,
                        spacing=None, device="cpu", name: str = "evaluate", keep: int = 0,
                        say: Callable[[str], None] = print) -> dict:
    """Evaluate a V-Net checkpoint on ``cases`` with test_LA.py's protocol (sliding window, largest connected
    component, Dice / Jaccard / HD95 / ASD; distances in voxels or in ``spacing`` units), printing one line
    per case through ``say``.

    Returns dict(mean, std (:func:`summarize_cases`), cases (per-case records), checkpoint, distance_unit,
    spacing, seconds, predictions: {case: uint8 (X, Y, Z)} for the first ``keep`` cases).
    """
    start = time.perf_counter()
    net, _ = load_specialist(checkpoint, device=torch.device(device))
    predictions: dict = {}
    done = []

    def on_case(case, image, label, prediction):
        done.append(case)
        if len(predictions) < keep:
            predictions[case] = prediction.astype(np.uint8)
        say(f"[{name}] case {len(done)}/{len(cases)} {case}: Dice {100 * binary_dice(prediction, label):.2f} %")

    records = evaluate(net, base_dir, cases, patch_size=tuple(patch_size), stride_xy=stride_xy, stride_z=stride_z,
                       spacing=spacing, device=torch.device(device), on_case=on_case)
    return dict(summarize_cases(records), cases=records, checkpoint=str(checkpoint),
                distance_unit="voxels" if spacing is None else "mm", spacing=None if spacing is None else list(spacing),
                seconds=time.perf_counter() - start, predictions=predictions)


def paired_comparison(base: dict, other: dict, base_name: str, other_name: str) -> dict:
    """Did ``other`` beat ``base`` on Dice? Paired per-case differences (points of Dice %) on the same cases,
    with two standard errors as the yardstick, and a sentence that says what happened whichever way it went.
    ``beyond_noise``: the difference exceeds two standard errors (False with a single case: no yardstick).

    ``base`` / ``other``: {'mean': {'dice'}, 'cases': [{'case', 'dice'}, ...]} (:func:`evaluate_checkpoint`).
    Raises ComparisonError when the two were evaluated on different cases."""
    a = {r["case"]: r["dice"] for r in base["cases"]}
    b = {r["case"]: r["dice"] for r in other["cases"]}
    if a.keys() != b.keys():
        raise ComparisonError(f"{base_name} and {other_name} were evaluated on different cases: "
                              f"{sorted(a)} vs {sorted(b)}")
    diff = np.array([100 * (b[c] - a[c]) for c in sorted(a)])
    n = len(diff)
    mean_diff = 100 * (other["mean"]["dice"] - base["mean"]["dice"])
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    beyond_noise = bool(n > 1 and abs(mean_diff) > 2 * se)
    verb = "beat" if mean_diff > 0 else ("tied with" if mean_diff == 0 else "did not beat")
    text = (f"{other_name} {verb} {base_name} on Dice: {100 * other['mean']['dice']:.2f} % vs "
            f"{100 * base['mean']['dice']:.2f} % ({mean_diff:+.2f} points; {other_name} higher on {wins} and "
            f"lower on {losses} of {n} test cases).")
    if n > 1 and not beyond_noise:
        text += (f" The difference is within two standard errors of the paired per-case differences "
                 f"({mean_diff:+.2f} ± {2 * se:.2f} points), so this run does not show a real difference.")
    elif beyond_noise:
        text += (f" The difference exceeds two standard errors of the paired per-case differences "
                 f"(± {2 * se:.2f} points) on these {n} cases.")
    text += " One seed, one short schedule: a demonstration, not a benchmark."
    return dict(base=base_name, other=other_name, other_beat_base=bool(mean_diff > 0), beyond_noise=beyond_noise,
                dice_difference_points=float(mean_diff), per_case_sd_points=sd, standard_error_points=se,
                other_higher_cases=wins, other_lower_cases=losses, n_cases=n, statement=text)


# ------------------------------------------------------------------------------- generalist vs predictions
def crop_box(mask: np.ndarray, size) -> tuple:
    """A box of ``size`` (clipped to the volume) centred on ``mask``'s bounding box (the volume centre when
    the mask is empty), shifted inside the volume; ((x0, x1), (y0, y1), (z0, z1)) half-open."""
    shape = mask.shape
    size = [min(int(s), n) for s, n in zip(size, shape)]
    fg = np.argwhere(mask > 0)
    centre = (fg.min(0) + fg.max(0)) / 2 if len(fg) else (np.array(shape) - 1) / 2
    box = []
    for c, s, n in zip(centre, size, shape):
        lo = int(min(max(round(c - s / 2), 0), n - s))
        box.append((lo, lo + s))
    return tuple(box)


def pseudo_label_in_crop(branch, image: np.ndarray, prediction: np.ndarray, size, device) -> tuple:
    """The generalist's pseudo-label for the crop of ``size`` around ``prediction``, prompted from the
    prediction only (as in SemiSAM training). image float (X, Y, Z), prediction {0,1} (X, Y, Z) ->
    (mask uint8 (X, Y, Z), zero outside the crop, box)."""
    box = crop_box(prediction, size)
    sl = tuple(slice(a, b) for a, b in box)
    img = torch.from_numpy(np.ascontiguousarray(image[sl], dtype=np.float32))[None, None].to(device)
    prob = torch.from_numpy(np.ascontiguousarray(prediction[sl] > 0, dtype=np.float32))[None].to(device)
    mask, _ = branch(img, prob)
    full = np.zeros(image.shape, np.uint8)
    full[sl] = mask[0].cpu().numpy().astype(np.uint8)
    return full, box


def generalist_check(branch, image: np.ndarray, label: np.ndarray, predictions: dict, size, device) -> list[dict]:
    """Prompt the generalist from each method's prediction of one case (:func:`pseudo_label_in_crop`) and
    score it inside its crop against the prompting prediction's own score there: SemiSAM can only gain where
    the generalist knows something the specialist does not.

    Returns one dict per method: prompted_by, mask (uint8 (X, Y, Z)), box, sam_dice_in_crop,
    prompt_dice_in_crop."""
    notes = []
    for name, prediction in predictions.items():
        mask, box = pseudo_label_in_crop(branch, image, prediction, size, device)
        sl = tuple(slice(a, b) for a, b in box)
        notes.append(dict(prompted_by=name, mask=mask, box=box, sam_dice_in_crop=binary_dice(mask[sl], label[sl]),
                          prompt_dice_in_crop=binary_dice(prediction[sl], label[sl])))
    return notes


def generalist_verdict(notes: Sequence[dict], names: Sequence[str], baseline: str) -> dict:
    """Mean Dice (%) of the generalist inside its crop vs the prompting prediction's, per method, and a sentence
    on whether it adds anything to ``baseline``'s predictions. ``notes``: :func:`generalist_check` dicts."""
    check = {}
    for name in names:
        rows = [n for n in notes if n["prompted_by"] == name]
        check[name] = dict(n_cases=len(rows), sam_dice=100 * float(np.mean([r["sam_dice_in_crop"] for r in rows])),
                           prompt_dice=100 * float(np.mean([r["prompt_dice_in_crop"] for r in rows])))
    b = check[baseline]
    check["statement"] = (
        f"Generalist check on {b['n_cases']} test case(s): prompted with clicks from {baseline}'s prediction, SAM "
        f"reaches Dice {b['sam_dice']:.1f} % inside its crop, {baseline}'s prediction itself {b['prompt_dice']:.1f} %; "
        + ("SAM adds information the specialist lacks, which is what the SemiSAM term feeds back."
           if b["sam_dice"] > b["prompt_dice"] else
           "SAM's pseudo-labels are worse than the specialist's own prediction, so the SemiSAM term is unlikely "
           "to help here (SemiSAM assumes a generalist that knows more than the specialist, e.g. the official "
           "SAM-Med3D in ckpt/sam_med3d.pth)."))
    return check


def check_generalist(branch, base_dir, predictions: dict, size, device, baseline: str, figure_cases: int = 0) -> dict:
    """:func:`generalist_check` on every case of ``predictions`` ({method: {case: prediction (X, Y, Z)}}, the
    same cases for every method; images and labels read with ``load_case``), summarised by
    :func:`generalist_verdict`.

    Returns dict(check, notes (per case and method, masks dropped: case, prompted_by, crop, sam_dice_in_crop,
    prompt_dice_in_crop), figure (``utils.figures.FigureCase`` of the first ``figure_cases`` cases))."""
    from dataloaders.la_heart import load_case
    from utils.figures import comparison_case
    notes, figure = [], []
    for i, case in enumerate(predictions[baseline]):
        image, label = load_case(base_dir, case, with_label=True)
        of_case = {name: by_case[case] for name, by_case in predictions.items()}
        case_notes = generalist_check(branch, image, label, of_case, size, device)
        if i < figure_cases:
            figure.append(comparison_case(case, image, label, of_case, case_notes))
        notes += [dict(case=case, prompted_by=n["prompted_by"], crop=[list(b) for b in n["box"]],
                       sam_dice_in_crop=n["sam_dice_in_crop"], prompt_dice_in_crop=n["prompt_dice_in_crop"])
                  for n in case_notes]
    return dict(check=generalist_verdict(notes, list(predictions), baseline), notes=notes, figure=figure)


# ------------------------------------------------------------------------------- generalist quality
def ground_truth_click_scores(branch, base_dir, cases: Sequence[str], size, device,
                              say: Callable[[str], None] | None = None) -> list[dict]:
    """The generalist's quality on labeled cases: clicks simulated from the GROUND TRUTH (the branch's click
    protocol, ``branch.num_clicks`` of them) in the crop of ``size`` centred on the target (as a training
    patch around the atrium would be), scored by Dice inside that crop. Any label > 0 is the target.

    This reads labels, so it is an evaluation of a generalist, never part of training. Returns one dict per
    case: case, dice (fraction), box, target_voxels."""
    from dataloaders.la_heart import load_case
    records = []
    for case in cases:
        image, label = load_case(base_dir, case, with_label=True)
        target = (label > 0).astype(np.uint8)
        mask, box = pseudo_label_in_crop(branch, image, target, size, device)
        sl = tuple(slice(a, b) for a, b in box)
        records.append(dict(case=case, dice=binary_dice(mask[sl], target[sl]), box=[list(b) for b in box],
                            target_voxels=int(target[sl].sum())))
        if say:
            say(f"{case}: Dice {100 * records[-1]['dice']:.2f} % with {branch.num_clicks} clicks")
    return records


def corpus_click_scores(branch, img_size: int, n: int, seed: int, device,
                        say: Callable[[str], None] | None = None) -> list[dict]:
    """The generalist's quality on ``n`` scenes of the synthetic shape corpus drawn with ``seed`` (held out
    when ``seed`` differs from the pretraining data seed: every scene is a pure function of (seed, index)),
    each a whole ``img_size``^3 scene with one target object, clicks simulated from its mask. Returns one dict
    per scene: index, dice (fraction), target_voxels."""
    from dataloaders.shape_corpus import ShapeCorpus
    corpus = ShapeCorpus(img_size, seed=seed)
    records = []
    for i in range(n):
        item = corpus[i]
        image = item["image"][None].to(device)                     # (1, 1, S, S, S)
        target = item["label"].bool()
        mask, _ = branch(image, target[None].float().to(device))
        records.append(dict(index=i, dice=binary_dice(mask[0].cpu().numpy() > 0, target.numpy()),
                            target_voxels=int(target.sum())))
        if say:
            say(f"scene {i}: Dice {100 * records[-1]['dice']:.2f} % with {branch.num_clicks} clicks")
    return records


def summarize_scores(records: Sequence[dict]) -> dict:
    """n, mean and population std (both in %) and min of the ``dice`` of ``records``."""
    d = np.array([r["dice"] for r in records], dtype=np.float64) * 100
    return dict(n=int(len(d)), dice_mean=float(d.mean()) if len(d) else math.nan,
                dice_std=float(d.std()) if len(d) else math.nan, dice_min=float(d.min()) if len(d) else math.nan)


# ------------------------------------------------------------------------------- over seeds
def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``values`` with a Student t interval (n - 1 degrees of freedom): dict(n, mean, sd (ddof 1),
    half_width, low, high, confidence); sd, half_width, low and high are nan for fewer than two values."""
    from scipy import stats
    v = np.asarray(values, dtype=np.float64)
    n = int(v.size)
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return dict(n=n, mean=mean, sd=sd, half_width=half, low=mean - half, high=mean + half, confidence=confidence)


def seed_averaged_gain(base_runs: Sequence[dict], other_runs: Sequence[dict], confidence: float = 0.95) -> dict:
    """The gain of a method over a baseline across seeds, in points of Dice %. ``base_runs[i]`` and
    ``other_runs[i]`` were trained with the same seed and evaluated on the same cases
    ({'mean': {'dice'}, 'cases': [{'case', 'dice'}, ...]}, :func:`evaluate_checkpoint`).

    Per test case, the paired difference other - base of each seed, averaged over the seeds; then the mean over
    the cases with a t interval over the cases (:func:`t_interval`): the cases are the unit of replication, the
    seeds only reduce each case's training noise. wins / losses: cases whose averaged difference is > 0 / < 0.

    Returns dict(gain_points, ci_low, ci_high, half_width, confidence, sd_points, n_cases, n_seeds, wins, losses,
    per_case {case: points}). Raises ComparisonError for unequal run counts or different cases."""
    if len(base_runs) != len(other_runs) or not base_runs:
        raise ComparisonError(f"seed_averaged_gain needs one baseline run per run of the method, got "
                              f"{len(base_runs)} and {len(other_runs)}")
    diffs = []
    for i, (base, other) in enumerate(zip(base_runs, other_runs)):
        a = {r["case"]: r["dice"] for r in base["cases"]}
        b = {r["case"]: r["dice"] for r in other["cases"]}
        if a.keys() != b.keys() or (diffs and sorted(a) != sorted(diffs[0])):
            raise ComparisonError(f"run pair {i} was evaluated on other cases than the first pair: "
                                  f"{sorted(a)} vs {sorted(b)}")
        diffs.append({c: 100 * (b[c] - a[c]) for c in a})
    cases = sorted(diffs[0])
    per_case = {c: float(np.mean([d[c] for d in diffs])) for c in cases}
    ci = t_interval(list(per_case.values()), confidence)
    values = np.array(list(per_case.values()))
    return dict(gain_points=ci["mean"], ci_low=ci["low"], ci_high=ci["high"], half_width=ci["half_width"],
                confidence=confidence, sd_points=ci["sd"], n_cases=len(cases), n_seeds=len(diffs),
                wins=int((values > 0).sum()), losses=int((values < 0).sum()), per_case=per_case)
