"""Loss functions of the SemiSAM / UA-MT family (all computed in float32 by the engine).

Shapes: B = batch, C = classes (2 for LA), spatial (X, Y, Z).

- ``dice_loss``: UA-MT's ``losses.dice_loss`` (smooth 1e-5, squared denominators).
- ``ce_dice_loss``: UA-MT's supervised loss ``0.5 * (CE + Dice(foreground))``.
- ``prob_mse``: voxel-wise squared difference of two probability maps (UA-MT's ``softmax_mse_loss`` takes logits
  and applies the softmax itself; the engine already holds probabilities, so this one takes them).
- ``predictive_entropy`` / ``uncertainty_masked_mse``: UA-MT's uncertainty map and masked consistency.
- ``pseudo_label_mse``: SemiSAM's MSE between the student's foreground probability and the SAM pseudo-label.
- ``confidence_weighted_mse``: SemiSAM+'s per-voxel confidence-weighted MSE. The official code divides the
  loss by itself (``x / (x + 1e-16)``, docs/design.md, defect 5), which leaves no gradient; this one does not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5
ENTROPY_EPS = 1e-6


def dice_loss(score: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - (2 sum(s t) + smooth) / (sum(s^2) + sum(t^2) + smooth)`` over all elements.

    Args:
        score: foreground probability, any shape, e.g. (B, X, Y, Z).
        target: same shape, bool or {0, 1}.
    Returns: scalar tensor.
    """
    if score.shape != target.shape:
        raise ValueError(f"dice_loss: score {tuple(score.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.float()
    intersect = torch.sum(score * target)
    y_sum = torch.sum(target * target)
    z_sum = torch.sum(score * score)
    return 1.0 - (2.0 * intersect + smooth) / (z_sum + y_sum + smooth)


def ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """UA-MT's supervised loss ``0.5 * (CE(logits, labels) + dice_loss(softmax[:, 1], labels == 1))``; with C > 2
    classes the Dice term is the mean of ``dice_loss(softmax[:, k], labels == k)`` over the foreground classes
    k = 1..C-1 (for C = 2 exactly UA-MT's).

    Args:
        logits: (L, C, X, Y, Z) float32 logits of the labeled patches.
        labels: (L, X, Y, Z) int64 class indices.
    Returns: (scalar loss, {'ce': scalar, 'dice': scalar}).
    """
    if logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(f"ce_dice_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    ce = F.cross_entropy(logits, labels)
    prob = F.softmax(logits, dim=1)
    if logits.shape[1] == 2:
        dice = dice_loss(prob[:, 1], labels == 1)
    else:
        dice = torch.stack([dice_loss(prob[:, k], labels == k) for k in range(1, logits.shape[1])]).mean()
    return 0.5 * (ce + dice), {"ce": ce, "dice": dice}


def prob_mse(student_prob: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """Voxel-wise ``(p_s - p_t)^2``; (B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
    if student_prob.shape != teacher_prob.shape:
        raise ValueError(f"prob_mse: student {tuple(student_prob.shape)} and teacher "
                         f"{tuple(teacher_prob.shape)} differ in shape")
    return (student_prob - teacher_prob) ** 2


def predictive_entropy(mean_prob: torch.Tensor) -> torch.Tensor:
    """UA-MT's uncertainty ``-sum_c p_c log(p_c + 1e-6)``; (B, C, X, Y, Z) -> (B, 1, X, Y, Z)."""
    return -torch.sum(mean_prob * torch.log(mean_prob + ENTROPY_EPS), dim=1, keepdim=True)


def uncertainty_masked_mse(mse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UA-MT's masked consistency ``sum(mask * mse) / (C * sum(mask) + 1e-16)``.

    Args:
        mse: (B, C, X, Y, Z) voxel-wise squared differences.
        mask: (B, 1, X, Y, Z) float {0, 1}, broadcast over the classes (C = 2 gives UA-MT's factor 2).
    Returns: scalar tensor.
    """
    if mask.shape[1] != 1 or mask.shape[0] != mse.shape[0] or mask.shape[2:] != mse.shape[2:]:
        raise ValueError(f"uncertainty_masked_mse: mask {tuple(mask.shape)} must be (B, 1, ...) of mse "
                         f"{tuple(mse.shape)}")
    return torch.sum(mask * mse) / (mse.shape[1] * torch.sum(mask) + 1e-16)


def pseudo_label_mse(student_fg_prob: torch.Tensor, pseudo_label: torch.Tensor) -> torch.Tensor:
    """SemiSAM's ``mean((p - m)^2)``; student_fg_prob and pseudo_label (B, X, Y, Z) -> scalar."""
    if student_fg_prob.shape != pseudo_label.shape:
        raise ValueError(f"pseudo_label_mse: student_fg_prob {tuple(student_fg_prob.shape)} and pseudo-label "
                         f"{tuple(pseudo_label.shape)} differ in shape")
    return torch.mean((student_fg_prob - pseudo_label) ** 2)


def confidence_weighted_mse(student_fg_prob: torch.Tensor, pseudo_label: torch.Tensor, confidence: torch.Tensor,
                            eps: float = 1e-8) -> torch.Tensor:
    """SemiSAM+'s ``sum(w (p - m)^2) / (sum(w) + eps)`` with the generalist's per-voxel confidence ``w``;
    student_fg_prob, pseudo_label, confidence (B, X, Y, Z) -> scalar.

    The confidence is a constant (no gradient flows into it); the gradient wrt ``student_fg_prob`` is
    ``2 w (p - m) / (sum(w) + eps)``, nonzero wherever the student and the generalist disagree.
    """
    if not student_fg_prob.shape == pseudo_label.shape == confidence.shape:
        raise ValueError(f"confidence_weighted_mse: student_fg_prob {tuple(student_fg_prob.shape)}, pseudo-label "
                         f"{tuple(pseudo_label.shape)} and confidence {tuple(confidence.shape)} must have one shape")
    confidence = confidence.detach()
    return torch.sum(confidence * (student_fg_prob - pseudo_label) ** 2) / (torch.sum(confidence) + eps)
