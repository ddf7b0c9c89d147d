"""Generalist terms: the student against the pseudo-labels of frozen SAM-Med3D generalist(s).

A generalist term owns its generalist: ``setup`` loads the checkpoints (``cfg.generalist``) into a
``utils.generalist.GeneralistBranch`` before any data is read, and each call prompts it with the student's
detached foreground probability on the unlabeled patches, so no label of an unlabeled scan ever reaches
it. A subclass only writes ``loss(student_fg_prob, labels)``; it gets everything the branch returns
(pseudo-label, per-voxel confidence, each prompt variant's logits, stats), and may call ``self.branch.encode``
/ ``self.branch.decode`` itself for prompts of its own.

- 'semisam': ``mean((p_fg - m)^2)``;
- 'semisam_plus': ``sum(w (p_fg - m)^2) / (sum(w) + 1e-8)`` with the per-voxel confidence ``w`` (gradient kept,
  unlike the official code: defect 5).

With K > 2 classes the generalist is prompted once per foreground class (SAM-Med3D is binary), the answers are
combined into one label map, overlaps resolved by confidence (``utils.generalist.combine_classes``), and the
loss is the mean over the classes. Weight ramped *down*: ``w_g(t) = sam_weight * sigmoid_rampup((T_max - t) // rampup_block, sam_rampdown)``.
Logs ``generalist/dice_vs_student``, ``generalist/foreground_fraction``, ``generalist/mean_confidence``;
visuals ``unlabeled/pseudo_label`` and ``unlabeled/confidence``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from utils import losses, ramps
from utils.errors import ConfigError
from utils.generalist import GeneralistBranch, PseudoLabels, combine_classes

from training.parts import SetupContext, Term, TermOutput, UnlabeledBatch, register_generalist_term


class GeneralistTerm(Term):
    """Base of the generalist terms (see the module docstring); subclasses implement ``loss``."""
    uses_unlabeled = True
    needs_generator = True          # the simulated clicks
    log_prefix = "generalist"
    uses_confidence = False         # whether ``loss`` uses the per-voxel confidence (a warning otherwise)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.branch: Optional[GeneralistBranch] = None

    def setup(self, ctx: SetupContext) -> None:
        """Load every ``cfg.generalist`` checkpoint onto the device (a missing one raises here, before any data
        is read) and build the branch with the run's precision, click generator and timer."""
        from networks.sam_med3d import load_generalist   # heavy import only when a generalist is used
        c = self.cfg
        models = [load_generalist(path, arch=c.generalist_arch, device=ctx.device) for path in c.generalist]
        if c.geometry == "pad":   # else the first step would find it, after the run started writing
            for path, model in zip(c.generalist, models):
                if any(int(p) > model.img_size for p in c.patch_size):
                    raise ConfigError(f"--geometry pad: patch_size {tuple(c.patch_size)} does not fit the "
                                      f"{model.img_size}^3 input of generalist {path}; use --geometry resample "
                                      f"or a smaller patch")
        if not self.uses_confidence and (c.prompt == "unc" or len(models) > 1):
            ctx.warn(f"generalist term {self.name!r} ignores the per-voxel confidence of prompt 'unc' / several "
                     f"generalists; use --generalist_term semisam_plus to weight by it")
        self.branch = GeneralistBranch(models, prompt=c.prompt, num_clicks=c.num_clicks, geometry=c.geometry,
                                       amp_dtype=ctx.amp_dtype, generator=ctx.generator, timer=ctx.timer)

    def weight(self, t: int) -> float:
        c = self.cfg
        return ramps.rampdown_weight(t, c.max_iterations, c.sam_weight, c.sam_rampdown, c.rampup_block)

    def loss(self, student_fg_prob: torch.Tensor, labels: PseudoLabels) -> torch.Tensor:
        """student_fg_prob: (U, X, Y, Z) float32 with autograd graph; labels: the branch's output for it."""
        raise NotImplementedError

    def __call__(self, batch: UnlabeledBatch) -> TermOutput:
        if batch.student_prob.shape[1] > 2:
            return self._call_classes(batch)
        student_fg_prob = batch.student_prob[:, 1]
        with batch.timer("generalist"):
            labels = self.branch.pseudo_labels(batch.images, student_fg_prob.detach())
        with batch.timer("loss"):
            loss = self.loss(student_fg_prob, labels)
        stats = labels.stats
        return TermOutput(loss, logs={"dice_vs_student": stats.dice_vs_student,
                                      "foreground_fraction": stats.foreground_fraction,
                                      "mean_confidence": stats.mean_confidence},
                          visuals={"pseudo_label": labels.pseudo_label[0], "confidence": labels.confidence[0]})

    def _call_classes(self, batch: UnlabeledBatch) -> TermOutput:
        """K > 2 classes: the generalist (binary) is prompted once per foreground class k by the student's
        probability of k, each image encoded once; the answers become one label map (``combine_classes``:
        overlaps go to the most confident answer) and ``loss`` is averaged over the classes, class k compared
        with ``label == k`` under the combined confidence."""
        prob = batch.student_prob
        with batch.timer("generalist"):
            with torch.inference_mode():
                embeddings = self.branch.encode(batch.images.detach())
            answers = [self.branch.pseudo_labels(batch.images, prob[:, k].detach(), embeddings)
                       for k in range(1, prob.shape[1])]
            label, confidence = combine_classes(answers)      # from the answers' normal tensors: usable as targets
        with batch.timer("loss"):
            loss = torch.stack([self.loss(prob[:, k], dataclasses.replace(
                answers[k - 1], pseudo_label=(label == k).float(), confidence=confidence))
                for k in range(1, prob.shape[1])]).mean()
        return TermOutput(loss, logs={"dice_vs_student": torch.stack([a.stats.dice_vs_student for a in answers]).mean(),
                                      "foreground_fraction": (label > 0).float().mean(),
                                      "mean_confidence": confidence.mean()},
                          visuals={"pseudo_label": label[0].float(), "confidence": confidence[0]})


@register_generalist_term
class SemiSAMTerm(GeneralistTerm):
    """SemiSAM: mean((p_fg - pseudo_label)^2), confidence ignored."""
    name = "semisam"

    def loss(self, student_fg_prob, labels):
        return losses.pseudo_label_mse(student_fg_prob, labels.pseudo_label)


@register_generalist_term
class SemiSAMPlusTerm(GeneralistTerm):
    """SemiSAM+: the squared error to the pseudo-label weighted by the generalists' per-voxel confidence."""
    name = "semisam_plus"
    uses_confidence = True

    def loss(self, student_fg_prob, labels):
        return losses.confidence_weighted_mse(student_fg_prob, labels.pseudo_label, labels.confidence)
