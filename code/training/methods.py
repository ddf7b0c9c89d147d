"""The method as small parts chosen by name (nnU-Net-style variants, segment-anything-style registries).

A step's loss is ``L = L_sup + w_c(t) * L_ssl + w_s(t) * L_sam`` (docs/design.md, section 1); each term is one part:

- ``SUPERVISED_LOSSES``: 'ce_dice' (UA-MT: ``0.5 * (CE + Dice)`` on the labeled patches).
- ``SPECIALISTS`` (specialist consistency, needs the EMA teacher):
    'none' - no consistency, no teacher (supervised baseline, or SemiSAM without MT);
    'mt'   - mean teacher: ``mean((p_s - p_t)^2)`` over unlabeled voxels and classes, p_t from the teacher on
             ``x_u + clamp(0.1 N(0,1), -0.2, 0.2)``;
    'uamt' - UA-MT: the same MSE restricted to voxels whose predictive entropy over T=8 noisy teacher passes is
             below ``(0.75 + 0.25 sigmoid_rampup(t, T_max)) ln 2``, normalised by ``2 sum(mask)``; the target
             pass is one of the T (``uamt_reuse_target``).
  Weight ``w_c(t) = consistency * sigmoid_rampup(t // 150, consistency_rampup)``.
- ``GENERALIST_TERMS`` (pseudo-labels of the frozen SAM-Med3D generalist on the unlabeled patches):
    'none', 'semisam' - ``mean((p_fg - m)^2)``, 'semisam_plus' - ``sum(w (p_fg - m)^2) / (sum(w) + 1e-8)``
    with the generalist's per-voxel confidence ``w`` (gradient kept, unlike the official code: docs/design.md, defect 5).
  Weight ramped *down*: ``w_s(t) = sam_weight * sigmoid_rampup((T_max - t) // 150, sam_rampdown)``.

The generalist is prompted from the *student's* detached foreground probability on the unlabeled patches
(docs/design.md: ``prompts(p_u.detach())``); no label of an unlabeled scan is ever available to it.
Unlike the official SemiSAM script, no unused teacher passes are computed (defect 8): the T stochastic passes
run only for 'uamt'.

Adding a variant: subclass ``Specialist`` or ``GeneralistTerm``, give it a ``name`` and register it with
``register_specialist`` / ``register_generalist_term``; the engine and the ``--specialist`` /
``--generalist_term`` flags pick it up by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from utils import losses, ramps

from training.timing import Timer, null_timer


# ------------------------------------------------------------------------------------------ teacher
class NoisyTeacher:
    """The EMA teacher's predictions on noisy copies of the unlabeled patches (UA-MT's input perturbation).

    Args:
        model: the teacher network, kept in train mode (dropout and batch-statistics BatchNorm stay active,
            as in UA-MT, which is what makes the T passes stochastic).
        noise_std, noise_clip: noise ``clamp(noise_std * N(0, 1), -noise_clip, noise_clip)``.
        autocast: a zero-argument factory of the autocast context for the forward pass.
        memory_format: memory format of the teacher input (channels_last_3d or contiguous).
    """

    def __init__(self, model: torch.nn.Module, noise_std: float = 0.1, noise_clip: float = 0.2,
                 autocast: Callable[[], ContextManager] | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.model = model
        self.noise_std = noise_std
        self.noise_clip = noise_clip
        self.autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
        self.memory_format = memory_format

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.clamp(torch.randn_like(x) * self.noise_std, -self.noise_clip, self.noise_clip)
        return (x + noise).contiguous(memory_format=self.memory_format)

    def _prob(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(self._noisy(x))
        return F.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def prob(self, x_u: torch.Tensor) -> torch.Tensor:
        """One noisy pass; (U, 1, X, Y, Z) -> softmax (U, C, X, Y, Z) float32 (usable as a loss target)."""
        return self._prob(x_u)

    def mean_prob(self, x_u: torch.Tensor, passes: int, passes_per_forward: int = 0,
                  done: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean softmax over ``passes`` independent noisy passes; (U, 1, ...) -> (U, C, ...) float32.

        ``done``: the softmax (U, C, ...) of a pass already made (e.g. the consistency target), counted as
        one of the ``passes``. ``passes_per_forward`` copies of the batch go through one forward call (0: all
        remaining passes at once), under ``torch.inference_mode`` (no autograd bookkeeping). The result is an
        inference tensor: use it inside inference mode or clone it.
        """
        u = x_u.shape[0]
        with torch.inference_mode():
            total = done
            made = 0 if done is None else 1
            while made < passes:
                n = passes - made if passes_per_forward <= 0 else min(passes_per_forward, passes - made)
                p = self._prob(x_u.repeat(n, 1, 1, 1, 1))          # (n*U, C, ...), pass-major
                s = p.view(n, u, *p.shape[1:]).sum(dim=0)
                total = s if total is None else total + s
                made += n
            return total / passes


# ------------------------------------------------------------------------------------------ parts
@dataclass
class UnlabeledInputs:
    """What a specialist consistency sees at step ``t`` (U = batch_size - labeled_bs unlabeled patches).

    x_u: (U, 1, X, Y, Z) images; prob_u: (U, C, X, Y, Z) float32 student softmax (with autograd graph).
    """
    t: int
    max_iterations: int
    x_u: torch.Tensor
    prob_u: torch.Tensor
    teacher: Optional[NoisyTeacher]
    timer: Timer = null_timer


class Specialist:
    """Specialist consistency 'none': no teacher, zero weight."""
    name = "none"
    needs_teacher = False

    def __init__(self, cfg):
        self.cfg = cfg

    def weight(self, t: int) -> float:
        return 0.0

    def __call__(self, inp: UnlabeledInputs) -> tuple[Optional[torch.Tensor], dict]:
        """-> (scalar consistency distance or None, extras for logging)."""
        return None, {}


class MeanTeacherConsistency(Specialist):
    """'mt': ``mean((p_s - p_t)^2)`` over the unlabeled patches, all voxels and classes."""
    name = "mt"
    needs_teacher = True

    def weight(self, t: int) -> float:
        c = self.cfg
        return ramps.consistency_weight(t, c.consistency, c.consistency_rampup, c.rampup_block)

    def _target(self, inp: UnlabeledInputs) -> torch.Tensor:
        with inp.timer("teacher"):
            return inp.teacher.prob(inp.x_u)

    def __call__(self, inp):
        p_t = self._target(inp)
        with inp.timer("loss"):
            return losses.prob_mse(inp.prob_u, p_t).mean(), {}


class UncertaintyAwareConsistency(MeanTeacherConsistency):
    """'uamt': MSE where the teacher's predictive entropy over T noisy passes is below UA-MT's threshold.

    The consistency target is a single noisy teacher pass. With ``uamt_reuse_target`` (default) it is also one
    of the T passes of the uncertainty, so T - 1 more passes are made; UA-MT made T separate passes besides
    it. Each pass draws fresh noise and dropout either way, so the estimator has the same distribution at
    8/9 of the teacher work. Batching several passes into one forward changes which samples share BatchNorm
    batch statistics (UA-MT used 2 copies per forward), not the estimator.
    """
    name = "uamt"

    def __call__(self, inp):
        p_t = self._target(inp)
        with inp.timer("uncertainty"):
            threshold = ramps.uamt_threshold(inp.t, inp.max_iterations)
            mean_p = inp.teacher.mean_prob(inp.x_u, self.cfg.uamt_passes, self.cfg.uamt_passes_per_forward,
                                           done=p_t if self.cfg.uamt_reuse_target else None)
            with torch.inference_mode():
                uncertainty = losses.predictive_entropy(mean_p)           # (U, 1, X, Y, Z)
                mask = (uncertainty < threshold).float()
            uncertainty, mask = uncertainty.clone(), mask.clone()     # normal tensors for autograd
        with inp.timer("loss"):
            dist = losses.uncertainty_masked_mse(losses.prob_mse(inp.prob_u, p_t), mask)
        return dist, {"threshold": threshold, "mask_fraction": mask.mean(), "uncertainty": uncertainty}


class GeneralistTerm:
    """Generalist term 'none'."""
    name = "none"
    needs_generalist = False
    weighted = False

    def __init__(self, cfg):
        self.cfg = cfg

    def weight(self, t: int) -> float:
        return 0.0

    def __call__(self, fg_prob_u: torch.Tensor, pseudo_label: torch.Tensor,
                 confidence: torch.Tensor) -> Optional[torch.Tensor]:
        return None


class SemiSAMTerm(GeneralistTerm):
    """'semisam': ``mean((p_fg - m)^2)``; fg_prob_u, pseudo_label (U, X, Y, Z); confidence ignored."""
    name = "semisam"
    needs_generalist = True

    def weight(self, t: int) -> float:
        c = self.cfg
        return ramps.rampdown_weight(t, c.max_iterations, c.sam_weight, c.sam_rampdown, c.rampup_block)

    def __call__(self, fg_prob_u, pseudo_label, confidence):
        return losses.pseudo_label_mse(fg_prob_u, pseudo_label)


class SemiSAMPlusTerm(SemiSAMTerm):
    """'semisam_plus': ``sum(w (p_fg - m)^2) / (sum(w) + 1e-8)`` with the generalist's confidence ``w``."""
    name = "semisam_plus"
    weighted = True

    def __call__(self, fg_prob_u, pseudo_label, confidence):
        return losses.confidence_weighted_mse(fg_prob_u, pseudo_label, confidence)


SupervisedLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]

SUPERVISED_LOSSES: dict[str, SupervisedLoss] = {"ce_dice": losses.ce_dice_loss}
SPECIALISTS: dict[str, type[Specialist]] = {}
GENERALIST_TERMS: dict[str, type[GeneralistTerm]] = {}


def register_specialist(cls: type[Specialist]) -> type[Specialist]:
    SPECIALISTS[cls.name] = cls
    return cls


def register_generalist_term(cls: type[GeneralistTerm]) -> type[GeneralistTerm]:
    GENERALIST_TERMS[cls.name] = cls
    return cls


for _cls in (Specialist, MeanTeacherConsistency, UncertaintyAwareConsistency):
    register_specialist(_cls)
for _cls in (GeneralistTerm, SemiSAMTerm, SemiSAMPlusTerm):
    register_generalist_term(_cls)


@dataclass
class MethodParts:
    supervised: SupervisedLoss
    specialist: Specialist
    generalist_term: GeneralistTerm


def build_method(cfg) -> MethodParts:
    """The parts named by ``cfg.supervised_loss``, ``cfg.specialist``, ``cfg.generalist_term``."""
    for registry, key, what in ((SUPERVISED_LOSSES, cfg.supervised_loss, "supervised loss"),
                                (SPECIALISTS, cfg.specialist, "specialist"),
                                (GENERALIST_TERMS, cfg.generalist_term, "generalist term")):
        if key not in registry:
            raise KeyError(f"{what} {key!r} is not registered; choose from {sorted(registry)}")
    return MethodParts(supervised=SUPERVISED_LOSSES[cfg.supervised_loss],
                       specialist=SPECIALISTS[cfg.specialist](cfg),
                       generalist_term=GENERALIST_TERMS[cfg.generalist_term](cfg))
