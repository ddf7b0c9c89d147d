"""The built-in parts of a step's loss, chosen by name (interface and registries: ``training.parts``).

A step's loss is ``L = L_sup + w_c(t) * L_c + w_g(t) * L_g`` (docs/design.md, section 1); each term is one part:

- ``SUPERVISED_LOSSES``: 'ce_dice' (UA-MT: ``0.5 * (CE + Dice)`` on the labeled patches).
- ``CONSISTENCY_TERMS`` (the specialist consistency, needs the EMA teacher; chosen by the ``--specialist``
  flag / ``TrainConfig.specialist``, names kept from the README and scripts):
    'none' - no consistency, no teacher (supervised baseline, or SemiSAM without MT);
    'mt'   - mean teacher: ``mean((p_s - p_t)^2)`` over unlabeled voxels and classes, p_t from the teacher on
             ``x_u + clamp(0.1 N(0,1), -0.2, 0.2)``;
    'uamt' - UA-MT: the same MSE restricted to voxels whose predictive entropy over T=8 noisy teacher passes is
             below ``(0.75 + 0.25 sigmoid_rampup(t, T_max)) ln 2``, normalised by ``2 sum(mask)``; the target
             pass is one of the T (``uamt_reuse_target``).
  Weight ``w_c(t) = consistency * sigmoid_rampup(t // 150, consistency_rampup)``.
- ``GENERALIST_TERMS`` (``training.generalist_terms``: pseudo-labels of the frozen SAM-Med3D generalist on the
  unlabeled patches, prompted by the student's detached foreground probability): 'none', 'semisam',
  'semisam_plus'. Weight ramped *down*: ``w_g(t) = sam_weight * sigmoid_rampup((T_max - t) // 150, sam_rampdown)``.

Unlike the official SemiSAM script, no unused teacher passes are computed (defect 8): the T stochastic passes
run only for 'uamt'.

Adding a part: one class with a ``name``, decorated with ``@register_consistency`` (subclass
``ConsistencyTerm``), ``@register_generalist_term`` (subclass ``training.generalist_terms.GeneralistTerm``) or
``@register_supervised_loss``; the engine and the flags pick it up by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from utils import losses, ramps

from training.generalist_terms import GeneralistTerm  # noqa: F401  (registers the generalist terms)
from training.parts import (CONSISTENCY_TERMS, GENERALIST_TERMS, SUPERVISED_LOSSES, LabeledBatch, SetupContext,
                            Term, TermOutput, UnlabeledBatch, register_consistency, register_supervised_loss)


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


# ------------------------------------------------------------------------------------------ supervised
@register_supervised_loss
class CeDiceLoss(Term):
    """UA-MT: 0.5 * (CE + Dice) on the labeled patches."""
    name = "ce_dice"
    log_prefix = "loss"

    def __call__(self, batch: LabeledBatch) -> TermOutput:
        loss, parts = losses.ce_dice_loss(batch.logits, batch.labels)
        return TermOutput(loss, logs=parts)


# ------------------------------------------------------------------------------------------ consistency
class ConsistencyTerm(Term):
    """Base of the specialist consistencies: the student against the EMA teacher on the unlabeled patches,
    weighted by ``w_c(t) = consistency * sigmoid_rampup(t // rampup_block, consistency_rampup)``."""
    uses_unlabeled = True
    needs_teacher = True
    log_prefix = "consistency"

    def weight(self, t: int) -> float:
        c = self.cfg
        return ramps.consistency_weight(t, c.consistency, c.consistency_rampup, c.rampup_block)

    def _teacher_prob(self, batch: UnlabeledBatch) -> torch.Tensor:
        """One noisy teacher pass: (U, C, X, Y, Z) float32 softmax."""
        with batch.timer("teacher"):
            return batch.teacher.prob(batch.images)


@register_consistency
class MeanTeacherConsistency(ConsistencyTerm):
    """mean teacher: mean((p_s - p_t)^2) over the unlabeled voxels and classes."""
    name = "mt"

    def __call__(self, batch: UnlabeledBatch) -> TermOutput:
        teacher_prob = self._teacher_prob(batch)
        with batch.timer("loss"):
            return TermOutput(losses.prob_mse(batch.student_prob, teacher_prob).mean())


@register_consistency
class UncertaintyAwareConsistency(ConsistencyTerm):
    """UA-MT: the MSE where the teacher's predictive entropy over T noisy passes is below a ramped threshold.

    The consistency target is a single noisy teacher pass. With ``uamt_reuse_target`` (default) it is also one
    of the T passes of the uncertainty, so T - 1 more passes are made; UA-MT made T separate passes besides
    it. Each pass draws fresh noise and dropout either way, so the estimator has the same distribution at
    8/9 of the teacher work. Batching several passes into one forward changes which samples share BatchNorm
    batch statistics (UA-MT used 2 copies per forward), not the estimator.
    Logs ``uncertainty/threshold`` and ``uncertainty/mask_fraction``; visual ``unlabeled/uncertainty``.
    """
    name = "uamt"
    log_prefix = "uncertainty"

    def __call__(self, batch: UnlabeledBatch) -> TermOutput:
        teacher_prob = self._teacher_prob(batch)
        with batch.timer("uncertainty"):
            threshold = ramps.uamt_threshold(batch.t, batch.max_iterations, batch.student_prob.shape[1])
            mean_p = batch.teacher.mean_prob(batch.images, self.cfg.uamt_passes, self.cfg.uamt_passes_per_forward,
                                             done=teacher_prob if self.cfg.uamt_reuse_target else None)
            with torch.inference_mode():
                uncertainty = losses.predictive_entropy(mean_p)           # (U, 1, X, Y, Z)
                mask = (uncertainty < threshold).float()
            uncertainty, mask = uncertainty.clone(), mask.clone()     # normal tensors for autograd
        with batch.timer("loss"):
            loss = losses.uncertainty_masked_mse(losses.prob_mse(batch.student_prob, teacher_prob), mask)
        return TermOutput(loss, logs={"threshold": threshold, "mask_fraction": mask.mean()},
                          visuals={"uncertainty": uncertainty[0, 0]})


# ------------------------------------------------------------------------------------------ a method
@dataclass
class MethodParts:
    """The parts of one method, by slot (the name under which the engine logs ``loss/<slot>``)."""
    supervised: Term
    consistency: Term
    generalist: Term

    @property
    def unlabeled_terms(self) -> dict[str, Term]:
        """slot -> part, in the order the engine adds them to the loss."""
        return {"consistency": self.consistency, "generalist": self.generalist}

    def _all(self) -> tuple[Term, ...]:
        return (self.supervised, self.consistency, self.generalist)

    @property
    def uses_unlabeled(self) -> bool:
        return any(p.uses_unlabeled for p in self._all())

    @property
    def needs_teacher(self) -> bool:
        return any(p.needs_teacher for p in self._all())

    @property
    def needs_generator(self) -> bool:
        return any(p.needs_generator for p in self._all())

    def setup(self, ctx: SetupContext) -> None:
        for part in self._all():
            part.setup(ctx)


def build_method(cfg) -> MethodParts:
    """The parts named by ``cfg.supervised_loss``, ``cfg.specialist``, ``cfg.generalist_term``."""
    return MethodParts(supervised=SUPERVISED_LOSSES.build(cfg.supervised_loss, cfg),
                       consistency=CONSISTENCY_TERMS.build(cfg.specialist, cfg),
                       generalist=GENERALIST_TERMS.build(cfg.generalist_term, cfg))
