"""Weight and learning-rate schedules of the training engine.

All functions are pure (plain Python floats in, float out) so a test can check them against their formula.
Iterations ``t`` are 0-based and counted *before* the step runs, as UA-MT's ``iter_num``.

- ``sigmoid_rampup``, ``linear_rampup``, ``cosine_rampdown``: UA-MT's ``utils/ramps.py`` (Laine & Aila 2017,
  Loshchilov & Hutter 2017).
- ``consistency_weight``: UA-MT's ``get_current_consistency_weight(iter_num // 150)``.
- ``rampdown_weight``: SemiSAM's generalist weight, the same sigmoid ramp evaluated at ``(T_max - t) // 150``,
  so it starts at its maximum and decays to ``w_max * exp(-5)``.
- ``uamt_threshold``: UA-MT's entropy threshold ``(0.75 + 0.25 * sigmoid_rampup(t, T_max)) * ln 2``.
- ``step_lr``: UA-MT's ``base_lr * 0.1 ** (t // 2500)``.
"""
from __future__ import annotations

import math


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """``exp(-5 (1 - clip(current / rampup_length, 0, 1))^2)``; 1.0 when ``rampup_length == 0``."""
    if rampup_length == 0:
        return 1.0
    current = min(max(float(current), 0.0), float(rampup_length))
    phase = 1.0 - current / rampup_length
    return math.exp(-5.0 * phase * phase)


def linear_rampup(current: float, rampup_length: float) -> float:
    """``clip(current / rampup_length, 0, 1)``; 1.0 when ``rampup_length == 0``."""
    if current < 0 or rampup_length < 0:
        raise ValueError(f"linear_rampup expects current >= 0 and rampup_length >= 0, got {current}, {rampup_length}")
    if current >= rampup_length:
        return 1.0
    return current / rampup_length


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """``0.5 (cos(pi current / rampdown_length) + 1)`` for ``0 <= current <= rampdown_length``."""
    if not 0 <= current <= rampdown_length:
        raise ValueError(f"cosine_rampdown expects 0 <= current <= {rampdown_length}, got {current}")
    return 0.5 * (math.cos(math.pi * current / rampdown_length) + 1.0)


def consistency_weight(t: int, w_max: float, rampup: float, block: int = 150) -> float:
    """Ramp-up weight ``w_max * sigmoid_rampup(t // block, rampup)`` (UA-MT: w_max 0.1, rampup 40, block 150)."""
    return w_max * sigmoid_rampup(t // block, rampup)


def rampdown_weight(t: int, max_iterations: int, w_max: float, rampdown: float, block: int = 150) -> float:
    """SemiSAM's ramp-down weight ``w_max * sigmoid_rampup((max_iterations - t) // block, rampdown)``."""
    return w_max * sigmoid_rampup((max_iterations - t) // block, rampdown)


def uamt_threshold(t: int, max_iterations: int, num_classes: int = 2) -> float:
    """UA-MT's uncertainty threshold ``(0.75 + 0.25 * sigmoid_rampup(t, max_iterations)) * ln 2``. ln 2 is the
    largest entropy of two classes; with C classes it is ln C (the same fraction of the largest entropy)."""
    return (0.75 + 0.25 * sigmoid_rampup(t, max_iterations)) * math.log(num_classes)


def step_lr(base_lr: float, t: int, step: int = 2500, gamma: float = 0.1) -> float:
    """Step decay ``base_lr * gamma ** (t // step)`` (UA-MT: step 2500, gamma 0.1)."""
    return base_lr * gamma ** (t // step)
