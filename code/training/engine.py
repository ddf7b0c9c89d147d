"""The one training engine: data, student/teacher, optimiser, schedules, loop, checkpoints, logging.

Every method (sup, MT, UA-MT, SemiSAM, SemiSAM+) runs through ``Trainer``; what differs is the parts chosen by
name in ``training.methods``. One step (``Trainer.train_step``), with the timed sections in brackets:

    [data]            move the batch to the device; labels are sliced to the labeled_bs labeled rows FIRST,
                      so no label row of an unlabeled scan reaches the device (the dataset never even read
                      them: LAHeart(withhold_labels=unlabeled indices) returns zeros for those rows)
    [student_forward] logits = student(x) (autocast if --amp bf16), softmax in float32
    [loss]            the parts of ``training.methods`` (interface: ``training.parts``): the supervised loss on
                      the labeled rows (a ``LabeledBatch``), then each unlabeled part (specialist consistency,
                      generalist term) on one ``UnlabeledBatch``; each returns a ``TermOutput`` and times its
                      own work in the sections below
    [teacher]         EMA teacher on noisy unlabeled patches (consistencies 'mt', 'uamt')
    [uncertainty]     T noisy teacher passes and the entropy mask ('uamt')
    [generalist]      the generalist term's pseudo-labels, prompted by the student's detached foreground
                      probability (and ``generalist.*`` sub-sections of ``utils.generalist.GeneralistBranch``)
    [backward]        L = L_sup + w_c(t) L_c + w_g(t) L_g; backward
    [optimizer]       SGD step with lr = base_lr * 0.1 ** (t // 2500)
    [ema]             teacher <- alpha teacher + (1 - alpha) student, alpha = min(1 - 1/(t+1), 0.99)

EMA teacher: like UA-MT's ``update_ema_variables``, only *parameters* are averaged. The teacher runs in train
mode (as UA-MT's ``ema_model.train()``), so its BatchNorm uses batch statistics and its running statistics
are updated by its own forward passes; they matter only if the saved teacher is evaluated. The teacher starts
as a copy of the student (UA-MT built an independently initialised network, which the first EMA update,
alpha = 0 at t = 0, overwrites with the student anyway; only the t = 0 consistency target differs).

Distributed (torchrun): the student is wrapped in DistributedDataParallel, each rank draws its own batches
(sampler ``rank``), noise and clicks (seeds offset by the rank); the teacher's parameters follow the
synchronised student identically on every rank and its BatchNorm buffers are broadcast from rank 0 after
each update. Only rank 0 writes files.

Determinism: one seed drives python, numpy, torch (offset by the rank), the sampler (augmentation seeds per
sample) and the parts' generator (the generalist's clicks); the DataLoader gets its own generator so creating
it consumes no global random numbers. Resuming from train_state.pth (all of the above restored) continues
bit-identically.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dataloaders.la_heart import (LAHeart, LADataError, RandomCrop, RandomRotFlip, ToTensor, Compose,
                                  TwoStreamBatchSampler, check_data_folder, load_case, read_list, split_labeled)
from networks.vnet import VNet
from utils import ramps
from utils.errors import ConfigError, ProjectError
from utils.inference import channels_last_default
from utils.io import TRAIN_STATE_FORMAT, atomic_save
from utils.runtime import autocast, derived_seed, resolve_device, seed_everything

from training import distributed as D
from training import state as S
from training.amp_check import check_bf16_training, check_bf16_validation
from training.interrupt import StopRequests, TrainingInterrupted, ignore_sigint_in_worker
from training.config import TrainConfig
from training.methods import NoisyTeacher, build_method
from training.parts import LabeledBatch, SetupContext, UnlabeledBatch
from training.outputs import RunOutput
from training.timing import Timer, null_timer

TRAIN_STATE_NAME = "train_state.pth"
BEST_MODEL_NAME = "best_model.pth"


class NonFiniteLossError(ProjectError, RuntimeError):
    """A loss term became NaN/Inf; no optimiser step was taken for that iteration. A ProjectError: the user
    can act on it (lower the learning rate, check the data) and the message says where the last good state is."""


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, t: int) -> float:
    """UA-MT's ``update_ema_variables``: parameters only, ``alpha = min(1 - 1/(t+1), decay)``; returns alpha."""
    alpha = min(1.0 - 1.0 / (t + 1), decay)
    t_params = [p.data for p in teacher.parameters()]
    s_params = [p.data for p in student.parameters()]
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    return alpha


def check_validation_cases(cfg: TrainConfig) -> list[str]:
    """The cases of ``--val_list``, each decoded and checked now (``dataloaders.la_heart.load_case``): a
    missing or broken validation case stops the run before its first iteration, not at its first validation.
    Raises LADataError naming the list or the case."""
    cases = read_list(cfg.val_list)
    for case in cases:
        try:
            load_case(cfg.root_path, case, num_classes=cfg.num_classes)
        except LADataError as err:
            raise LADataError(f"--val_list {cfg.val_list}: {err}") from None
    return cases


class _Batches:
    """The sampler's batches, keeping only the first ``keep`` entries (labeled rows) when the method uses no
    unlabeled patch, so the supervised baseline never loads them. DataLoader ``batch_sampler``."""

    def __init__(self, sampler: TwoStreamBatchSampler, keep: Optional[int] = None):
        self.sampler, self.keep = sampler, keep

    def __iter__(self):
        for batch in self.sampler:
            yield batch if self.keep is None else batch[:self.keep]


def _prefixed(prefix: str, items: dict) -> dict:
    """{'<prefix>/<key>': value} (a part's logs or visuals under its prefix)."""
    return {f"{prefix}/{k}": v for k, v in items.items()}


def _read_scalars(entries: dict) -> dict[str, float]:
    """name -> python float of each 0-d tensor or float in ``entries``, the tensors read in one host sync."""
    names = [n for n, v in entries.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([entries[n].detach().float() for n in names]).tolist() if names else []
    values = dict(zip(names, read))
    return {n: values[n] if n in values else float(v) for n, v in entries.items()}


@dataclass
class StepResult:
    """Scalars of one step (python floats) and, on image iterations, volumes (X, Y, Z) for TensorBoard."""
    iteration: int                      # 0-based index t of the step
    values: dict = field(default_factory=dict)
    visuals: Optional[dict] = None

    @property
    def loss(self) -> float:
        return self.values["loss/total"]


class Trainer:
    """One semi-supervised training run (any method of ``training.methods``).

    Args:
        cfg: validated ``TrainConfig``.
        ctx: distributed context (default: a world of one on ``cfg.device``).
        output: where logs/files go (default: a ``RunOutput`` on the main rank).
        timer: ``timer(name)`` -> context manager around each step section (default: no-op); see
            ``training.timing.SectionTimer`` for a CUDA-synchronising one.
    """

    def __init__(self, cfg: TrainConfig, ctx: Optional[D.DistContext] = None, output: Optional[RunOutput] = None,
                 timer: Timer = null_timer):
        self.cfg = cfg
        self.ctx = ctx or D.DistContext(device=resolve_device(cfg.device))
        self.device = self.ctx.device
        self.out = output or RunOutput(cfg, self.ctx.is_main)
        self.timer = timer
        self.iteration = 0                   # completed steps
        self.best: Optional[dict] = None     # {'dice', 'iteration'} with validation
        self._last_saved: Optional[int] = None
        self._pending_validation = False     # resumed from a state saved just before a validation
        self.last_result: Optional[StepResult] = None

        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cudnn.deterministic = cfg.deterministic
        channels_last = cfg.channels_last if cfg.channels_last is not None else channels_last_default(self.device)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        if self.amp_dtype is not None:
            check_bf16_training(cfg.patch_size, self.device, self.memory_format)
            if cfg.val_every:
                check_bf16_validation(self.device)

        self.method = build_method(cfg)
        self.uses_unlabeled = self.method.uses_unlabeled
        self.term_generator: Optional[torch.Generator] = None
        if self.method.needs_generator:
            self.term_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, self.ctx.rank, 7))
        # the parts first (a generalist term loads its checkpoints): a missing file must stop the run before
        # any data is read
        self.method.setup(SetupContext(device=self.device, amp_dtype=self.amp_dtype, timer=timer,
                                       generator=self.term_generator, warn=self.out.warning))
        self._build_data()
        # seeded here, after the parts' setup: load_generalist may or may not build (and randomly initialise)
        # a SAM depending on its per-process cache, which must not shift the student's initialisation
        seed_everything(cfg.seed + self.ctx.rank)
        self._build_models()

    # ------------------------------------------------------------------------------------ building
    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _build_data(self) -> None:
        cfg = self.cfg
        list_file = cfg.train_list_path
        check_data_folder(cfg.root_path)     # before the list beside it: a wrong --root_path is named as such
        cases = read_list(list_file)
        self.labeled_idxs, self.unlabeled_idxs = split_labeled(len(cases), cfg.labeled_num)
        if not self.unlabeled_idxs and self.uses_unlabeled:
            raise ConfigError(f"labeled_num={cfg.labeled_num} leaves no unlabeled case in {list_file} "
                             f"({len(cases)} cases); a semi-supervised method needs at least one")
        transform = Compose([RandomRotFlip(), RandomCrop(cfg.patch_size), ToTensor()])
        self.dataset = LAHeart(base_dir=cfg.root_path, list_file=list_file, transform=transform, cache=cfg.cache,
                               withhold_labels=self.unlabeled_idxs, num_classes=cfg.num_classes)
        if cfg.val_every:
            check_validation_cases(cfg)
        used = self.labeled_idxs + (self.unlabeled_idxs if self.uses_unlabeled else [])
        if cfg.cache:   # before any worker forks, so the workers share one decoded copy
            self.dataset.preload(used)
        else:           # decoded once and dropped: a bad file stops the run before it writes anything
            self.dataset.verify(used)
        n_unlabeled = cfg.batch_size - cfg.labeled_bs
        if not self.unlabeled_idxs:
            n_unlabeled = 0          # supervised only with every case labeled: no unlabeled stream at all
        self.sampler = TwoStreamBatchSampler(self.labeled_idxs, self.unlabeled_idxs, cfg.labeled_bs + n_unlabeled,
                                             n_unlabeled, seed=cfg.seed, rank=self.ctx.rank,
                                             world_size=self.ctx.world_size)

    def _build_models(self) -> None:
        cfg = self.cfg
        student = VNet(**cfg.vnet_kwargs).to(self.device, memory_format=self.memory_format)
        student.train()
        student.checkpoint_levels = cfg.checkpoint_levels   # the teacher never records autograd: no effect there
        if self.ctx.enabled:
            # DDP broadcasts rank 0's parameters and buffers here, so the teacher copy below is identical too
            self.model = DistributedDataParallel(
                student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = student
        self.student = student
        self.teacher = None
        self.noisy_teacher = None
        if self.method.needs_teacher:
            self.teacher = copy.deepcopy(student).train()
            self.teacher.requires_grad_(False)
            self.noisy_teacher = NoisyTeacher(self.teacher, cfg.noise_std, cfg.noise_clip, self._autocast,
                                              self.memory_format)
        self.optimizer = torch.optim.SGD(student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)

    def make_loader(self) -> DataLoader:
        """A DataLoader yielding this rank's batches from ``self.sampler``'s current position."""
        keep = None if self.uses_unlabeled else self.cfg.labeled_bs
        return DataLoader(self.dataset, batch_sampler=_Batches(self.sampler, keep), num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda", worker_init_fn=ignore_sigint_in_worker,
                          generator=torch.Generator().manual_seed(derived_seed(self.cfg.seed, self.ctx.rank, 3)))

    # ------------------------------------------------------------------------------------ schedules
    def lr_at(self, t: int) -> float:
        return ramps.step_lr(self.cfg.base_lr, t, self.cfg.lr_step, self.cfg.lr_gamma)

    def weights_at(self, t: int) -> dict[str, float]:
        """slot -> w(t) of each unlabeled part (specialist consistency, generalist term)."""
        return {slot: part.weight(t) for slot, part in self.method.unlabeled_terms.items()}

    # ------------------------------------------------------------------------------------ one step
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> (images (B|L, 1, X, Y, Z), labels (L, X, Y, Z)) on the device; checks the row layout."""
        nl = self.cfg.labeled_bs
        labeled = batch["labeled"]
        if not bool(labeled[:nl].all()) or bool(labeled[nl:].any()):
            raise RuntimeError(f"batch layout broken: expected {nl} labeled rows first, then unlabeled rows; "
                               f"got labeled flags {labeled.tolist()} for cases {batch.get('case')}")
        labels = batch["label"][:nl]                  # sliced on the host: unlabeled rows never move
        images = batch["image"]
        if not self.uses_unlabeled:
            images = images[:nl]
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> StepResult:
        """One optimisation step on ``batch`` (a collated LAHeart batch); advances ``self.iteration``."""
        cfg, timer, t = self.cfg, self.timer, self.iteration
        nl = cfg.labeled_bs
        with timer("data"):
            x, y_l = self._to_device(batch)
        lr = self.lr_at(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        weights = self.weights_at(t)

        with timer("student_forward"):
            with self._autocast():
                logits = self.model(x)
            logits = logits.float()
            prob = F.softmax(logits, dim=1)
        supervised = self.method.supervised
        with timer("loss"):
            sup = supervised(LabeledBatch(logits[:nl], y_l))
        total = sup.loss
        # name -> scalar (0-d tensor or float): the losses and every part's logs, in the order they are logged
        entries = {"loss/supervised": sup.loss, **_prefixed(supervised.log_prefix, sup.logs)}
        unlabeled_visuals: dict = {}
        if self.uses_unlabeled:
            unlabeled = UnlabeledBatch(t, cfg.max_iterations, x[nl:], prob[nl:], self.noisy_teacher, timer)
            for slot, part in self.method.unlabeled_terms.items():
                out = part(unlabeled)
                if out.loss is not None:
                    entries[f"loss/{slot}"] = out.loss
                    total = total + weights[slot] * out.loss
                entries.update(_prefixed(part.log_prefix, out.logs))
                unlabeled_visuals.update(out.visuals)
        entries = {"loss/total": total, **entries}

        values = _read_scalars(entries)       # the step's one host sync
        losses = {n: v for n, v in values.items() if n.startswith("loss/")}
        finite = all(np.isfinite(v) for v in losses.values())
        if D.any_rank_true(not finite, self.ctx):
            raise NonFiniteLossError(self._non_finite_message(t, losses, weights, finite))

        with timer("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        with timer("optimizer"):
            self.optimizer.step()
        if self.teacher is not None:
            with timer("ema"):
                ema_update(self.teacher, self.student, cfg.ema_decay, t)
                D.broadcast_buffers(self.teacher, self.ctx)
        self.iteration = t + 1

        # log order: the losses, the schedule, then the parts' diagnostics
        values = {**losses, "train/lr": lr, **{f"weights/{slot}": w for slot, w in weights.items()},
                  **{n: v for n, v in values.items() if n not in losses}}
        visuals = None
        if cfg.image_every > 0 and t % cfg.image_every == 0:
            visuals = {"labeled/image": x[0, 0], "labeled/label": y_l[0].float(),
                       "labeled/prediction": prob[0, 1], **_prefixed("labeled", sup.visuals)}
            if self.uses_unlabeled:
                visuals.update({"unlabeled/image": x[nl, 0], "unlabeled/prediction": prob[nl, 1],
                                **_prefixed("unlabeled", unlabeled_visuals)})
        return StepResult(iteration=t, values=values, visuals=visuals)

    def _non_finite_message(self, t: int, losses: dict, weights: dict, finite_here: bool) -> str:
        terms = ", ".join(f"{k.removeprefix('loss/')}={v:.6g}" for k, v in losses.items())
        where = "" if finite_here else f" on rank {self.ctx.rank}"
        if not finite_here or not self.ctx.enabled:
            detail = f"{terms} (weights: " + ", ".join(f"{slot} {w:.6g}" for slot, w in weights.items()) + ")"
        else:
            detail = f"on another rank (this rank: {terms})"
        kept = (f"the last good state is {self.state_path} (iteration {self._last_saved})"
                if self._last_saved is not None else "no train state had been saved yet")
        return (f"non-finite loss at iteration {t}{where}: {detail}; training stopped before the optimiser "
                f"step, {kept}")

    # ------------------------------------------------------------------------------------ loop
    @property
    def state_path(self) -> Path:
        return self.cfg.snapshot_path / TRAIN_STATE_NAME

    def fit(self, stop: Optional[StopRequests] = None,
            after_first_step: Optional[Callable[[], None]] = None) -> None:
        """Train from ``self.iteration`` to ``max_iterations`` (or ``stop_after``), saving as configured.

        ``after_first_step``: called once, after this invocation's first training step (e.g. the entry point's
        memory-dependent malloc choice, which needs that step's peak).

        ``stop``: the run's signal handlers (``training.interrupt``); when one was received, the loop saves
        the state at the end of the iteration and raises ``TrainingInterrupted`` (on every rank at the same
        iteration). The first validation is preceded by a save of the state, so a run whose validation fails
        can be resumed; that state is marked, and a run resumed from it validates first."""
        cfg = self.cfg
        stop = stop or StopRequests()
        stop_at = cfg.stop_after if cfg.stop_after is not None else cfg.max_iterations
        self.out.open_files()   # no-op when the entry point opened them after its checks
        if self._pending_validation:
            self.validate()
            self.save_state()
        self.sampler.load_state_dict({"next_batch": self.iteration})
        loader = self.make_loader()
        batches = iter(loader)
        self.out.info(f"training {self.describe()} from iteration {self.iteration} to {stop_at} "
                      f"(max_iterations {cfg.max_iterations}) on {self.device}")
        self.out.start_progress(self.iteration, stop_at)
        start = time.perf_counter()
        first_step_done = self.iteration
        try:
            with stop.deferring():
                while self.iteration < stop_at:
                    with self.timer("data"):
                        batch = next(batches)
                    result = self.train_step(batch)
                    self.last_result = result
                    self._record(result)
                    done = self.iteration
                    if done == first_step_done + 1 and after_first_step is not None:
                        after_first_step()
                    if done % cfg.save_every == 0 or done == cfg.max_iterations:
                        self.save_checkpoint(self.cfg.snapshot_path / f"iter_{done}.pth")
                    saved_first = False
                    if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.max_iterations):
                        if self._last_saved is None:
                            self.save_state(pending_validation=True)
                            saved_first = True
                        self.validate()
                    if done % cfg.save_every == 0 or done == stop_at or saved_first:
                        self.save_state()
                    # every rank learns of a signal any rank received (the largest signal number if several);
                    # after the last iteration the run is complete and ends as such
                    signum = D.max_over_ranks(stop.requested or 0, self.ctx) if done < stop_at else 0
                    if signum:
                        if self._last_saved != self.iteration:
                            self.save_state()
                        raise TrainingInterrupted(signum, self.iteration, self.state_path, saved=True)
        except TrainingInterrupted as err:
            if err.iteration is None:    # a second signal, raised in the middle of the iteration
                raise TrainingInterrupted(err.signum, self.iteration,
                                          self.state_path if self._last_saved is not None else None) from None
            raise
        finally:
            del batches   # stops DataLoader workers
        # DDP broadcasts rank 0's BatchNorm buffers before each forward, after which every rank updates them with
        # its own batch; align them once more so every rank ends with rank 0's (saved) student
        D.broadcast_buffers(self.student, self.ctx)
        self.out.info(f"stopped at iteration {self.iteration} after {time.perf_counter() - start:.1f} s"
                      + ("" if self.iteration == cfg.max_iterations else
                         f"; resume with --resume {self.state_path}"))

    def describe(self) -> str:
        c = self.cfg
        gen = ("" if c.generalist_term == "none" else
               f", generalist {c.generalist_term} ({c.prompt}, {len(c.generalist)})")
        return (f"supervised {c.supervised_loss}, specialist {c.specialist}{gen}, {len(self.labeled_idxs)} labeled + "
                f"{len(self.unlabeled_idxs)} unlabeled cases, batch {c.batch_size} ({c.labeled_bs} labeled)")

    def _record(self, r: StepResult) -> None:
        step = r.iteration + 1     # UA-MT logs after iter_num += 1
        self.out.scalars(r.values, step)
        if r.visuals:
            self.out.images(r.visuals, step)
        if self.cfg.log_every and step % self.cfg.log_every == 0:
            self.out.iteration_line(f"iteration {step} : " + ", ".join(
                f"{k.removeprefix('loss/')}: {v:.6g}" for k, v in r.values.items()))
        self.out.advance(r.loss)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path) -> None:
        """The plain student state_dict (UA-MT keys; loadable by test_LA.py and the official test script)."""
        if self.ctx.is_main:
            atomic_save(self.student.state_dict(), path)
            self.out.info(f"save model to {path}")

    def state_dict(self, pending_validation: bool = False) -> dict:
        """The train state (format: ``training.state``); RNG bundles of all ranks (a collective call).
        ``pending_validation``: saved just before the validation of this iteration (which a resumed run then
        runs first)."""
        rng = D.gather_objects(S.capture_rng(self.device, self.term_generator), self.ctx)
        config = self.cfg.to_dict()
        config.update(cases=list(self.dataset.cases), world_size=self.ctx.world_size)
        return {"format": TRAIN_STATE_FORMAT, "version": S.STATE_VERSION, "iteration": self.iteration,
                "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "optimizer": self.optimizer.state_dict(), "config": config, "rng": rng,
                "sampler": {**self.sampler.state_dict(), "next_batch": self.iteration},
                "lr": self.lr_at(max(self.iteration - 1, 0)), "best": self.best,
                "pending_validation": pending_validation}

    def save_state(self, pending_validation: bool = False) -> None:
        """Write train_state.pth atomically (every rank takes part in gathering the RNG states)."""
        state = self.state_dict(pending_validation)
        if self.ctx.is_main:
            atomic_save(state, self.state_path)
        self._last_saved = self.iteration

    def load_state(self, path) -> None:
        """Continue exactly where the train state at ``path`` stopped."""
        st = S.load_train_state(path)
        current = self.cfg.to_dict()
        current.update(cases=list(self.dataset.cases))
        changed = S.check_resume_config(st["config"], current, path)
        if changed:
            self.out.warning("resuming with changed settings: " + ", ".join(
                f"{k} {st['config'][k]!r} -> {current[k]!r}" for k in changed))
        if "max_iterations" in changed:
            self.out.warning("max_iterations changed: the SemiSAM ramp-down and the UA-MT threshold follow the "
                             "new value, so the run differs from one trained with it from the start")
        if (st["teacher"] is None) != (self.teacher is None):
            raise S.TrainStateError(f"{path}: teacher presence differs from specialist {self.cfg.specialist!r}")
        self.student.load_state_dict(st["student"], strict=True)
        if self.teacher is not None:
            self.teacher.load_state_dict(st["teacher"], strict=True)
        self.optimizer.load_state_dict(st["optimizer"])
        self.iteration = int(st["iteration"])
        self.best = st.get("best")
        self._pending_validation = bool(st.get("pending_validation")) and bool(self.cfg.val_every)
        self._last_saved = self.iteration
        self.sampler.load_state_dict({k: v for k, v in st["sampler"].items() if k != "rank"})
        bundles = st["rng"]
        if len(bundles) == self.ctx.world_size:
            S.restore_rng(bundles[self.ctx.rank], self.device, self.term_generator)
        else:
            self.out.warning(f"{path} was written by {len(bundles)} rank(s), this run has {self.ctx.world_size}: "
                             f"random streams are re-seeded, so the continuation is not bit-identical")
            seed_everything(derived_seed(self.cfg.seed, self.ctx.rank, self.iteration))
            if self.term_generator is not None:
                self.term_generator.manual_seed(derived_seed(self.cfg.seed, self.ctx.rank, self.iteration, 7))
        self.out.info(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------------------------ validation
    def validate(self) -> Optional[float]:
        """Mean Dice of the student over --val_list by sliding window (LCC post-processing, as the test
        protocol; with K > 2 classes the mean over cases and foreground classes, the largest component of each
        class kept); saves best_model.pth when it improves. Main rank only; returns the mean Dice there."""
        if not self.ctx.is_main:
            return None
        from utils.inference import evaluate, evaluate_classes
        cfg = self.cfg
        cases = read_list(cfg.val_list)
        kw = dict(patch_size=cfg.patch_size, stride_xy=cfg.val_stride_xy, stride_z=cfg.val_stride_z,
                  post_process=True, amp_dtype=self.amp_dtype, device=self.device)
        if cfg.num_classes == 2:
            records = evaluate(self.student, cfg.root_path, cases, **kw)
        else:
            records = [{m: float(np.nanmean([c[m] for c in r["classes"].values()])) for m in ("dice", "hd95")}
                       for r in evaluate_classes(self.student, cfg.root_path, cases, cfg.num_classes, **kw)]
        dice = float(np.mean([r["dice"] for r in records]))
        self.out.scalars({"val/dice": dice, "val/hd95_voxels": float(np.mean([r["hd95"] for r in records]))},
                         self.iteration)
        improved = self.best is None or dice > self.best["dice"]
        if improved:
            self.best = {"dice": dice, "iteration": self.iteration}
            atomic_save(self.student.state_dict(), cfg.snapshot_path / BEST_MODEL_NAME)
        self.out.info(f"validation at iteration {self.iteration}: mean Dice {dice:.4f} over {len(cases)} cases"
                      + (" (best so far, saved best_model.pth)" if improved else
                         f" (best {self.best['dice']:.4f} at iteration {self.best['iteration']})"))
        return dice
