"""Schedules, losses and method parts against their formulas and hand-computed values (no data needed)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.engine import ema_update
from training.methods import (CONSISTENCY_TERMS, GENERALIST_TERMS, NoisyTeacher, build_method)
from training.parts import TermOutput, UnlabeledBatch
from training.timing import SECTIONS, SectionTimer, null_timer
from utils import losses, ramps


# --------------------------------------------------------------------------------------- schedules
def test_sigmoid_rampup_formula():
    assert ramps.sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5.0))
    assert ramps.sigmoid_rampup(10, 40) == pytest.approx(math.exp(-5.0 * 0.75 ** 2))
    assert ramps.sigmoid_rampup(40, 40) == 1.0 and ramps.sigmoid_rampup(99, 40) == 1.0
    assert ramps.sigmoid_rampup(-3, 40) == pytest.approx(math.exp(-5.0))
    assert ramps.sigmoid_rampup(7, 0) == 1.0
    assert ramps.linear_rampup(5, 20) == 0.25 and ramps.linear_rampup(30, 20) == 1.0
    assert ramps.cosine_rampdown(0, 10) == 1.0 and ramps.cosine_rampdown(10, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="cosine_rampdown"):
        ramps.cosine_rampdown(11, 10)


@pytest.mark.parametrize("t", [0, 149, 150, 3000, 5999, 6000, 9000])
def test_weights_follow_the_formulas_at_given_iterations(t):
    cfg = TrainConfig(specialist="uamt", generalist_term="semisam", generalist=["x.pth"])
    parts = build_method(cfg)
    block = (t // 150) / 40
    assert parts.consistency.weight(t) == pytest.approx(0.1 * math.exp(-5 * (1 - min(block, 1)) ** 2), rel=1e-12)
    down = min(max((6000 - t) // 150, 0) / 40, 1)
    assert parts.generalist.weight(t) == pytest.approx(0.1 * math.exp(-5 * (1 - down) ** 2), rel=1e-12)
    assert ramps.uamt_threshold(t, 6000) == pytest.approx(
        (0.75 + 0.25 * math.exp(-5 * (1 - min(t / 6000, 1)) ** 2)) * math.log(2), rel=1e-12)
    # the ramp-down starts at the maximum and decays
    assert parts.generalist.weight(0) == pytest.approx(0.1)
    assert parts.generalist.weight(5999) == pytest.approx(0.1 * math.exp(-5))


@pytest.mark.parametrize("t, lr", [(0, 0.01), (2499, 0.01), (2500, 0.001), (4999, 0.001), (5000, 1e-4),
                                   (5999, 1e-4)])
def test_lr_steps(t, lr):
    assert ramps.step_lr(0.01, t) == pytest.approx(lr, rel=1e-12)


def test_none_parts_have_zero_weight_and_no_loss():
    parts = build_method(TrainConfig(specialist="none", generalist_term="none"))
    assert parts.consistency.weight(3000) == 0.0 and parts.generalist.weight(0) == 0.0
    assert not parts.consistency.needs_teacher and not parts.generalist.uses_unlabeled and not parts.uses_unlabeled
    assert parts.consistency(None) == TermOutput(None) == parts.generalist(None)
    assert set(CONSISTENCY_TERMS) == {"none", "mt", "uamt"}
    assert set(GENERALIST_TERMS) == {"none", "semisam", "semisam_plus"}
    with pytest.raises(KeyError, match="specialist 'x' is not registered"):
        build_method(TrainConfig(specialist="x"))


# --------------------------------------------------------------------------------------- losses
def test_dice_loss_hand_value():
    s = torch.tensor([[0.9, 0.2], [0.6, 0.0]])
    t = torch.tensor([[1, 0], [1, 1]])
    inter, ss, tt = 0.9 + 0.6, 0.81 + 0.04 + 0.36, 3.0
    expected = 1 - (2 * inter + 1e-5) / (ss + tt + 1e-5)
    assert losses.dice_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.dice_loss(s, t[:1])


def test_ce_dice_is_uamt_supervised_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, 2, generator=g)
    labels = torch.randint(0, 2, (2, 4, 4, 2), generator=g)
    loss, terms = losses.ce_dice_loss(logits, labels)
    ce = F.cross_entropy(logits, labels)
    p1 = F.softmax(logits, 1)[:, 1]
    dice = 1 - (2 * (p1 * labels).sum() + 1e-5) / ((p1 * p1).sum() + labels.sum() + 1e-5)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["dice"].item() == pytest.approx(dice.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * (ce + dice).item(), rel=1e-6)


def test_uamt_entropy_mask_and_loss_hand_computed():
    # two voxels, two classes, one sample: mean teacher probabilities (0.5, 0.5) and (0.9, 0.1)
    mean_p = torch.tensor([[0.5, 0.9], [0.5, 0.1]]).view(1, 2, 2, 1, 1)
    u = losses.predictive_entropy(mean_p)
    u0 = -2 * 0.5 * math.log(0.5 + 1e-6)
    u1 = -(0.9 * math.log(0.9 + 1e-6) + 0.1 * math.log(0.1 + 1e-6))
    assert u.shape == (1, 1, 2, 1, 1)
    assert u.flatten().tolist() == pytest.approx([u0, u1], rel=1e-6)
    threshold = ramps.uamt_threshold(0, 6000)          # 0.75 ln 2 + tiny = 0.5222...: keeps only voxel 1
    mask = (u < threshold).float()
    assert mask.flatten().tolist() == [0.0, 1.0]
    p_s = torch.tensor([[0.2, 0.7], [0.8, 0.3]]).view(1, 2, 2, 1, 1)
    p_t = torch.tensor([[0.4, 0.6], [0.6, 0.4]]).view(1, 2, 2, 1, 1)
    loss = losses.uncertainty_masked_mse(losses.prob_mse(p_s, p_t), mask)
    expected = ((0.7 - 0.6) ** 2 + (0.3 - 0.4) ** 2) / (2 * 1 + 1e-16)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # an all-masked batch gives 0, not NaN
    assert losses.uncertainty_masked_mse(losses.prob_mse(p_s, p_t), torch.zeros_like(mask)).item() == 0.0


def test_confidence_weighted_mse_hand_value_and_gradient():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.4]], requires_grad=True).view(1, 4, 1, 1)
    p.retain_grad()
    m = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1)
    w = torch.tensor([1.0, 0.5, 0.0, 0.25]).view(1, 4, 1, 1)
    loss = losses.confidence_weighted_mse(p, m, w)
    sw = 1.75
    expected = (1 * 0.01 + 0.5 * 0.64 + 0 + 0.25 * 0.16) / (sw + 1e-8)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad = (2 * w * (p.detach() - m) / (sw + 1e-8)).flatten()
    assert torch.allclose(p.grad.flatten(), grad, rtol=1e-6)
    assert p.grad.abs().sum() > 0.1          # the official x / (x + 1e-16) would give ~0 here
    # SemiSAM's unweighted term is the plain mean
    assert losses.pseudo_label_mse(p.detach(), m).item() == pytest.approx(
        ((p.detach() - m) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("term", ["semisam", "semisam_plus"])
def test_generalist_term_has_gradient_wrt_student_output(term):
    """Through the method part, from the student's logits: the SAM term moves the student."""
    from utils.generalist import GeneralistStats, PseudoLabels
    cfg = TrainConfig(specialist="mt", generalist_term=term, generalist=["x.pth"])
    part = build_method(cfg).generalist
    logits = torch.randn(2, 2, 8, 8, 4, requires_grad=True)
    mask = (torch.rand(2, 8, 8, 4) > 0.5).float()
    conf = torch.rand(2, 8, 8, 4)
    prompts = []

    class StubBranch:      # stands in for GeneralistBranch: the term calls it itself
        def pseudo_labels(self, images, student_fg_prob):
            prompts.append(student_fg_prob)
            zero = torch.zeros(())
            return PseudoLabels(mask, conf, (), GeneralistStats(zero, zero, 1, mask.mean(), conf.mean(), zero))

    part.branch = StubBranch()
    out = part(UnlabeledBatch(0, 6000, torch.zeros(2, 1, 8, 8, 4), F.softmax(logits, 1)))
    assert len(prompts) == 1 and not prompts[0].requires_grad          # prompted by the detached probability
    assert torch.equal(prompts[0], F.softmax(logits, 1)[:, 1].detach())
    assert out.logs["mean_confidence"] == conf.mean() and out.visuals["pseudo_label"] is not None
    out.loss.backward()
    assert logits.grad is not None and logits.grad.abs().max() > 1e-4


# --------------------------------------------------------------------------------------- teacher
class _Affine(nn.Module):
    """Deterministic stand-in for a teacher: logits (x, -x) per voxel, so softmax is known."""

    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def test_noisy_teacher_noise_and_batched_passes():
    x = torch.linspace(-1, 1, 2 * 16).view(2, 1, 4, 2, 2)
    exact = F.softmax(torch.cat([x, -x], 1), 1)
    quiet = NoisyTeacher(_Affine(), noise_std=0.0, noise_clip=0.2)
    assert torch.allclose(quiet.prob(x), exact)
    for per_forward in (0, 1, 3):
        assert torch.allclose(quiet.mean_prob(x, passes=8, passes_per_forward=per_forward).clone(), exact,
                              atol=1e-6)
    # noise is clamp(0.1 N(0,1), -0.2, 0.2): recover it from the affine teacher's first channel
    seen = []
    teacher = NoisyTeacher(lambda v: (seen.append(v.clone()), torch.cat([v, -v], 1))[1])
    teacher.prob(x)
    noise = seen[0] - x
    assert noise.abs().max() <= 0.2 + 1e-7 and 0.05 < noise.std() < 0.15
    seen.clear()
    teacher.mean_prob(x, passes=8, passes_per_forward=3)
    assert [s.shape[0] for s in seen] == [6, 6, 4]        # 3 + 3 + 2 passes of a batch of 2
    assert not torch.equal(seen[0][:2], seen[0][2:4])     # independent noise per pass
    # a pass already made counts as one of the passes: 7 more, and it enters the mean with weight 1/8
    seen.clear()
    done = torch.zeros_like(exact)
    mean = teacher.mean_prob(x, passes=8, passes_per_forward=3, done=done)
    assert [s.shape[0] for s in seen] == [6, 6, 2]
    again = sum(F.softmax(torch.cat([v, -v], 1), 1).view(-1, *x.shape[:1], *exact.shape[1:]).sum(0)
                for v in seen)
    assert torch.allclose(mean.clone(), again / 8, atol=1e-6)


@pytest.mark.parametrize("reuse, forwards", [(True, [2, 4, 2]), (False, [2, 4, 4])])
def test_uamt_target_pass_is_one_of_the_T_passes_unless_disabled(reuse, forwards):
    # batch sizes of the teacher forwards for U = 2, T = 4, 2 passes per forward: the target pass (2), then
    # the T - 1 = 3 remaining passes (4 + 2) with reuse, or all T = 4 passes (4 + 4) as UA-MT
    cfg = TrainConfig(specialist="uamt", uamt_passes=4, uamt_reuse_target=reuse)
    part = build_method(cfg).consistency
    seen = []
    teacher = NoisyTeacher(lambda v: (seen.append(v.shape[0]), torch.cat([v, -v], 1))[1])
    p_s = torch.full((2, 2, 2, 2, 2), 0.5, requires_grad=True)
    part(UnlabeledBatch(0, 6000, torch.zeros(2, 1, 2, 2, 2), p_s, teacher))
    assert seen == forwards


def test_uamt_part_uses_the_threshold_mask():
    cfg = TrainConfig(specialist="uamt", uamt_passes=4)
    part = build_method(cfg).consistency
    x = torch.cat([torch.zeros(1, 1, 2, 2, 2), 3 * torch.ones(1, 1, 2, 2, 2)])   # uncertain / confident sample
    teacher = NoisyTeacher(_Affine(), noise_std=0.0)
    p_s = torch.full((2, 2, 2, 2, 2), 0.5, requires_grad=True)
    out = part(UnlabeledBatch(0, 6000, x, p_s, teacher))
    dist = out.loss
    assert out.logs["mask_fraction"].item() == pytest.approx(0.5)          # only the confident sample kept
    p_t = F.softmax(torch.cat([x, -x], 1), 1)
    expected = ((p_s.detach()[1] - p_t[1]) ** 2).sum() / (2 * 8)
    assert dist.item() == pytest.approx(expected.item(), rel=1e-6)
    dist.backward()
    assert p_s.grad[0].abs().sum() == 0 and p_s.grad[1].abs().sum() > 0


# --------------------------------------------------------------------------------------- EMA, timer, malloc
def test_ema_updates_parameters_only_with_uamt_alpha():
    torch.manual_seed(0)
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.copy_(torch.randn_like(p))
    student.running_mean.fill_(7.0)
    assert ema_update(teacher, student, 0.99, 0) == 0.0                 # t = 0: teacher := student
    assert torch.equal(teacher.weight, student.weight) and torch.equal(teacher.bias, student.bias)
    assert torch.equal(teacher.running_mean, torch.zeros(3))            # buffers are not averaged (UA-MT)
    t_w, s_w = teacher.weight.clone(), torch.randn(3)
    with torch.no_grad():
        student.weight.copy_(s_w)
    alpha = ema_update(teacher, student, 0.99, 5)
    assert alpha == pytest.approx(1 - 1 / 6)
    assert torch.allclose(teacher.weight, alpha * t_w + (1 - alpha) * s_w)
    assert ema_update(teacher, student, 0.99, 1000) == 0.99


def test_section_timer_accumulates_and_null_timer_is_free():
    ticks = iter(range(100))
    timer = SectionTimer(clock=lambda: float(next(ticks)))
    for _ in range(2):
        with timer("teacher"):
            pass
    with timer("backward"):
        pass
    s = timer.summary()
    assert list(s) == ["teacher", "backward"] and s["teacher"]["count"] == 2
    assert s["teacher"]["total_s"] == 2.0 and s["backward"]["mean_ms"] == 1000.0
    with null_timer("data"):
        pass
    assert "ema" in SECTIONS and "uncertainty" in SECTIONS


def test_tune_malloc_applies_on_glibc():
    """In a child process: mallopt changes process-wide allocator behaviour, which the test session keeps."""
    import platform
    import subprocess
    import sys
    from pathlib import Path
    code = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", "from training.run import tune_malloc; print(tune_malloc())"],
                          cwd=code, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
