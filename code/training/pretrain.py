"""Promptable-segmentation (pre)training of a SAM-Med3D-architecture generalist with the SAM-Med3D recipe.

Two uses, one loop:

- **pretrain** a small generalist from scratch on the synthetic shape corpus (``dataloaders.shape_corpus``),
  which holds no atrium-like target, so that the SemiSAM demo runs end to end without downloads;
- **fine-tune** a real SAM-Med3D checkpoint (``init``) on a labeled h5 collection (``data``: folders
  ``<case>/mri_norm2.h5`` plus a list file), with random crops that contain foreground with probability
  ``fg_prob``.

The recipe (SAM-Med3D ``train.py``): the image is encoded once per batch; then ``num_clicks`` prompt steps, each
adding one simulated click per sample (``utils.clicks.next_clicks`` with pred = the current mask, target = the
TRAINING mask; clicks accumulate) and feeding the previous low-res logits back as the mask prompt (the graph is
kept across steps, as in SAM-Med3D). One random step in [2, num_clicks-2] and the last step are mask-only
(points=None), as SAM-Med3D's ``random_insert``. The first step's mask prompt is, with probability
``no_mask_prob``, absent (the learned ``no_mask_embed``; SAM-Med3D always feeds a zero mask, which is what
SemiSAM's point prompting uses, so both must work). Loss per step: Dice (per sample, squared denominators,
smooth 1e-5, as MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True)``) + BCE on the low-res logits upsampled
trilinearly to the input size; the steps' losses are summed (SAM-Med3D's ``return_loss += loss``). AdamW,
linear warm-up then cosine (or SAM-Med3D's step decay x0.1 at 60 % and 90 %).

Inputs are normalised exactly as the generalist branch normalises them at inference
(``utils.generalist.sam_znorm``: z-score over voxels > 0, as torchio's ``ZNormalization``), and a fraction
``pad_prob`` of them is shrunk to a centred box padded with the darkest value (:func:`simulate_padding`), which
is what the branch's 'pad' geometry shows the generalist (SAM-Med3D's own crops are CropOrPad'ed too).

Determinism and resume: every random draw of iteration ``t`` comes from generators seeded by (seed, t)
(data: sample index ``t * batch_size + b``; clicks and step choices: ``SeedSequence(seed, (1, t))``), so the
whole RNG state of a run is (seed, iteration) and a resumed run is bit-identical to an uninterrupted one on
the same machine and thread count. The checkpoint is the official format plus training fields::

    {'model_state_dict', 'optimizer_state_dict', 'iteration', 'epoch' (= iteration), 'config' (the
     architecture, golden-fixture format), 'format': 'semisam_generalist_pretrain', 'version': 1,
     'train_args': dict, 'losses': list[float]}

written atomically (``utils.io.atomic_save``: tmp file, fsync, os.replace), with the config also written to
``<out without suffix>.json`` so ``load_generalist(out, arch=<json>)`` and ``--generalist_arch <json>`` work.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataloaders.la_heart import list_path, load_case, read_list
from dataloaders.shape_corpus import ShapeCorpus
from utils.clicks import accumulate_clicks, next_clicks
from utils.errors import ProjectError
from utils.generalist import sam_znorm
from utils.io import atomic_save, atomic_write, check_torch_file
from utils.progress import Progress
from utils.runtime import derived_seed

__all__ = ["PretrainError", "PretrainConfig", "CKPT_FORMAT", "config_json_path", "resolve_arch", "build_model",
           "snapshot_path", "H5Crops", "seg_loss", "interaction_loss", "simulate_padding", "lr_at", "save_checkpoint",
           "read_checkpoint", "pretrain", "SAME_MODEL_KEYS", "checkpoint_status", "ensure_pretrained"]

log = logging.getLogger("pretrain")

CKPT_FORMAT = "semisam_generalist_pretrain"
DICE_SMOOTH = 1e-5
# stream keys of derived_seed(seed, key): the data, the clicks and step choices, the initial weights
_DATA_STREAM = 0
_CLICK_STREAM = 1
_INIT_STREAM = 2
# settings that define the sample stream, the model or the optimisation: a resume must not change them
_RESUME_MUST_MATCH = ("seed", "batch_size", "num_clicks", "targets_per_image", "lr", "weight_decay", "lr_schedule",
                      "warmup", "clip_grad", "no_mask_prob", "pad_prob", "fg_prob", "data", "data_list")


class PretrainError(ProjectError, ValueError):
    """Bad pretraining settings, data or checkpoint (the message names the setting or file)."""


@dataclass
class PretrainConfig:
    """All settings of a (pre)training run; see pretrain_generalist.py for the command-line flags."""
    out: str = "../ckpt/demo_generalist.pth"
    arch: str = "vit_tiny_demo"              # registry name (sam3d_config) ...
    arch_config: str | None = None          # ... or a JSON config file (golden-fixture format); wins over arch
    init: str | None = None                 # checkpoint to start from (load_generalist's rules), else random
    data: str | None = None                 # folder of <case>/mri_norm2.h5; None = the synthetic shape corpus
    data_list: str | None = None            # list file of `data` (default <data>/../train.list)
    iterations: int = 2000
    batch_size: int = 2
    lr: float = 8e-4
    weight_decay: float = 0.1
    lr_schedule: str = "cosine"             # 'cosine' | 'step' | 'constant'
    warmup: int = 50
    clip_grad: float = 1.0                  # max grad norm; 0 = off
    seed: int = 0
    device: str = "cpu"
    num_clicks: int = 5
    targets_per_image: int = 1              # corpus objects prompted separately on each image encoding
    no_mask_prob: float = 0.5
    pad_prob: float = 0.25
    fg_prob: float = 0.5
    workers: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_every: int = 0                     # also keep a copy <out stem>_iter<N>.pth every N iterations (0: none)
    resume: str | None = None               # checkpoint to continue from
    stop_at: int | None = None              # save and stop after this iteration (a time-limited job's slice)
    progress: bool = True


def config_json_path(out) -> Path:
    """Where the architecture JSON of checkpoint ``out`` is written: ``out`` with suffix ``.json``."""
    return Path(out).with_suffix(".json")


def snapshot_path(out, iteration: int) -> Path:
    """The kept copy of checkpoint ``out`` at ``iteration`` (``keep_every``): ``<stem>_iter<N><suffix>``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_iter{int(iteration)}{out.suffix}")


def _check_settings(cfg: PretrainConfig) -> None:
    def bad(name, expected):
        raise PretrainError(f"--{name}={getattr(cfg, name)!r}: expected {expected}")
    if cfg.iterations < 1:
        bad("iterations", "an integer >= 1")
    if cfg.batch_size < 1:
        bad("batch_size", "an integer >= 1")
    if cfg.num_clicks < 1:
        bad("num_clicks", "an integer >= 1")
    if cfg.targets_per_image < 1:
        bad("targets_per_image", "an integer >= 1")
    if cfg.targets_per_image > 1 and cfg.data:
        bad("targets_per_image", "1 with --data (an h5 collection has one target per crop; several need the "
                                 "shape corpus)")
    if not cfg.lr > 0:
        bad("lr", "a positive learning rate")
    if cfg.lr_schedule not in ("cosine", "step", "constant"):
        bad("lr_schedule", "'cosine', 'step' or 'constant'")
    if cfg.warmup < 0:
        bad("warmup", "an integer >= 0")
    if not 0 <= cfg.no_mask_prob <= 1:
        bad("no_mask_prob", "a probability in [0, 1]")
    if not 0 <= cfg.fg_prob <= 1:
        bad("fg_prob", "a probability in [0, 1]")
    if not 0 <= cfg.pad_prob <= 1:
        bad("pad_prob", "a probability in [0, 1]")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.iterations:
        bad("stop_at", f"an iteration in [1, {cfg.iterations}]")
    if cfg.save_every < 1 or cfg.log_every < 1:
        bad("save_every" if cfg.save_every < 1 else "log_every", "an integer >= 1")
    if cfg.keep_every < 0:
        bad("keep_every", "an integer >= 0 (0: no snapshots)")


# ----------------------------------------------------------------------------------------------- model

def resolve_arch(arch: str, arch_config: str | None = None) -> dict:
    """The architecture config dict: from the JSON file ``arch_config`` if given, else the registry's ``arch``."""
    from networks.sam_med3d import GeneralistCheckpointError, arch_to_config, sam3d_config
    if not arch_config:
        return sam3d_config(arch)            # KeyError naming the known entries
    if not Path(arch_config).is_file():
        raise PretrainError(f"architecture config {arch_config} not found (expected a JSON file in the "
                            "golden-fixture config format)")
    try:
        return arch_to_config(arch_config)
    except GeneralistCheckpointError as err:
        raise PretrainError(str(err)) from None


def build_model(config: dict, seed: int, init: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """A trainable Sam3D (train mode) for ``config``: random weights drawn from ``seed`` without touching the
    global torch RNG, or the weights of checkpoint ``init`` read with ``load_generalist``'s rules (path or bare
    name in ckpt/, state dict or dict with 'model_state_dict', prefixes stripped, strict)."""
    from networks.sam_med3d import build_sam3d_from_config
    from networks.sam_med3d.build import config_label
    from networks.sam_med3d.checkpoint import load_checkpoint_into
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, _INIT_STREAM))
        model = build_sam3d_from_config(config)
    if init:
        # load_generalist's reading rules on a private model: load_generalist itself returns a cached, shared,
        # frozen object that must not be trained
        load_checkpoint_into(model, init, arch_label=config_label(config))
    return model.to(device).train()


# ----------------------------------------------------------------------------------------------- data

class H5Crops(Dataset):
    """Random ``img_size``^3 crops of a labeled h5 collection; item ``i`` is a pure function of (seed, i).

    The case is uniform; with probability ``fg_prob`` the crop contains a uniformly chosen foreground voxel
    (at a uniform position inside the crop), else its corner is uniform. Volumes smaller than the crop are
    padded with their minimum (label 0), as the generalist branch pads patches with the darkest value.

    __getitem__(i) -> dict(image torch.float32 (1,S,S,S), label torch.uint8 (S,S,S), idx int, case str).
    """

    def __init__(self, base_dir, cases: list[str], img_size: int, seed: int = 0, fg_prob: float = 0.5,
                 length: int = 2 ** 31 - 1):
        if not cases:
            raise PretrainError(f"no cases to crop from in {base_dir}")
        self.base_dir, self.cases = Path(base_dir), list(cases)
        self.img_size, self.seed, self.fg_prob, self.length = int(img_size), int(seed), float(fg_prob), length
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # image, label, fg voxels
        # decode every case now: a bad file (LADataError naming it) stops the run before any checkpoint is
        # written, and DataLoader workers forked later share the decoded arrays
        for case in self.cases:
            self._case(case)

    def __len__(self) -> int:
        return self.length

    def _case(self, case: str):
        if case not in self._cache:
            image, label = load_case(self.base_dir, case)
            extra = [max(0, self.img_size - n) for n in image.shape]
            if any(extra):
                pad = [(e // 2, e - e // 2) for e in extra]
                image = np.pad(image, pad, constant_values=float(image.min()))
                label = np.pad(label, pad)
            fg = np.argwhere(label > 0)
            self._cache[case] = (image, label, fg)
        return self._cache[case]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(index),)))
        case = self.cases[int(rng.integers(len(self.cases)))]
        image, label, fg = self._case(case)
        s = self.img_size
        if len(fg) and rng.random() < self.fg_prob:
            voxel = fg[int(rng.integers(len(fg)))]
            lo = np.maximum(voxel - s + 1, 0)
            hi = np.minimum(voxel, np.array(image.shape) - s)
            corner = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
        else:
            corner = [int(rng.integers(0, n - s + 1)) for n in image.shape]
        box = tuple(slice(c, c + s) for c in corner)
        return {"image": torch.from_numpy(np.ascontiguousarray(image[box]))[None],
                "label": torch.from_numpy(np.ascontiguousarray(label[box])), "idx": int(index), "case": case}


def _dataset(cfg: PretrainConfig, img_size: int) -> Dataset:
    data_seed = derived_seed(cfg.seed, _DATA_STREAM)
    if not cfg.data:
        return ShapeCorpus(img_size, seed=data_seed, targets=cfg.targets_per_image)
    base = Path(cfg.data)
    if not base.is_dir():
        raise PretrainError(f"--data {base}: folder not found (expected a folder of <case>/mri_norm2.h5)")
    cases = read_list(cfg.data_list or list_path(base, "train"))
    return H5Crops(base, cases, img_size, seed=data_seed, fg_prob=cfg.fg_prob)


def _collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (B, 1, S, S, S), targets (B, K, S, S, S) (K = 1 for a single-target dataset)."""
    labels = torch.stack([it["label"] for it in items])
    return torch.stack([it["image"] for it in items]), labels[:, None] if labels.dim() == 4 else labels


# ----------------------------------------------------------------------------------------------- loss

def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice (per sample, squared denominators) + BCE, both averaged over the batch.

    logits: (B, X, Y, Z) float; target: (B, X, Y, Z) bool/{0,1}. Returns a scalar.
    """
    target = target.float()
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + (target * target).sum(dims)
    dice = 1 - (2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def interaction_loss(model, images: torch.Tensor, targets: torch.Tensor, num_clicks: int,
                     generator: torch.Generator, rng: np.random.Generator,
                     no_mask_prob: float = 0.5) -> tuple[torch.Tensor, dict]:
    """SAM-Med3D's iterative-click training loss for one batch.

    Args:
        images: (B, 1, S, S, S) normalised inputs; targets: (B, S, S, S) bool training masks, or (B, K, S, S, S):
            K objects of each image, each prompted on its own with the image encoded once (SAM's several
            masks per image: K times the supervision of one encoder pass at the cost of K decoder runs).
        generator: CPU torch.Generator for the random clicks; rng: numpy Generator for the step choices.
    Returns:
        (summed loss over the steps (scalar, with graph), info dict: 'step_losses' list[float],
         'dice' float hard Dice of the last step's masks, pooled over the B * K prompts).
    """
    s = images.shape[-3:]
    per_image = targets.shape[1] if targets.dim() == 5 else 1
    targets = targets.bool().reshape((-1,) + tuple(s))
    targets_cpu = targets.cpu()
    embeddings = model.image_encoder(images)
    if per_image > 1:
        embeddings = embeddings.repeat_interleave(per_image, dim=0)
    image_pe = model.prompt_encoder.get_dense_pe()
    low_res = images.new_zeros((embeddings.shape[0], 1) + tuple(4 * n for n in embeddings.shape[-3:]))
    mask_only = {num_clicks - 1} if num_clicks >= 2 else set()
    if num_clicks > 3:
        mask_only.add(int(rng.integers(2, num_clicks - 1)))
    no_mask_first = bool(rng.random() < no_mask_prob)

    pred = torch.zeros_like(targets_cpu)
    history = None
    total, step_losses = images.new_zeros(()), []
    for step in range(num_clicks):
        coords, labels = next_clicks(pred, targets_cpu, step, generator)
        history = accumulate_clicks(history, coords, labels)
        points = None if step in mask_only else (history[0].to(images.device), history[1].to(images.device))
        masks = None if (step == 0 and no_mask_first) else low_res
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=masks)
        low_res, _ = model.mask_decoder(image_embeddings=embeddings, image_pe=image_pe,
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
        logits = F.interpolate(low_res, size=s, mode="trilinear", align_corners=False)[:, 0]
        loss = seg_loss(logits, targets)
        total = total + loss
        step_losses.append(float(loss.detach()))
        pred = (logits.detach() > 0).cpu()
    inter = (pred & targets_cpu).sum().item()
    dice = 2 * inter / max(1, pred.sum().item() + targets_cpu.sum().item())
    return total, {"step_losses": step_losses, "dice": dice}


def simulate_padding(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, prob: float,
                     min_voxels: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Make some inputs look like the generalist branch's 'pad' geometry: a patch centred in the S^3 cube,
    the rest filled with the darkest value of the patch (target 0 there).

    Per sample, with probability ``prob``: a centred box of U(0.5, 1) * S voxels per axis is kept; a sample
    any of whose targets would keep fewer than ``min_voxels`` voxels (but had more) is left whole.
    images: (B, 1, S, S, S) normalised; targets: (B, S, S, S) or (B, K, S, S, S) bool. Returns new tensors of the
    same shapes.
    """
    images, targets = images.clone(), targets.clone()
    size = images.shape[-3:]
    for b in range(images.shape[0]):
        if rng.random() >= prob:
            continue
        keep = [int(round(rng.uniform(0.5, 1.0) * n)) for n in size]
        box = tuple(slice((n - k) // 2, (n - k) // 2 + k) for n, k in zip(size, keep))
        inside = torch.zeros(size, dtype=torch.bool, device=images.device)
        inside[box] = True
        per_target = targets[b].reshape((-1,) + tuple(size))
        kept = (per_target & inside).flatten(1).sum(1)
        if bool(((kept < min_voxels) & (per_target.flatten(1).sum(1) >= min_voxels)).any()):
            continue
        images[b, 0][~inside] = images[b, 0][box].min()
        targets[b] &= inside
    return images, targets


def lr_at(cfg: PretrainConfig, t: int) -> float:
    """Learning rate of iteration t (0-based): linear warm-up, then cosine to 0 / step decay / constant."""
    if t < cfg.warmup:
        return cfg.lr * (t + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":  # SAM-Med3D: MultiStepLR milestones at 60 % and 90 % of training, gamma 0.1
        return cfg.lr * 0.1 ** ((t >= 0.6 * cfg.iterations) + (t >= 0.9 * cfg.iterations))
    span = max(1, cfg.iterations - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - cfg.warmup) / span)))


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer, iteration: int, config: dict, cfg: PretrainConfig,
                    losses: list[float]) -> Path:
    """Write the checkpoint (official keys + training fields) and its config JSON, both atomically."""
    path = Path(path)
    state = {"format": CKPT_FORMAT, "version": 1,
             "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
             "iteration": int(iteration), "epoch": int(iteration), "config": config,
             "train_args": dataclasses.asdict(cfg), "losses": [float(x) for x in losses]}
    atomic_save(state, path)
    atomic_write(config_json_path(path), lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return path


def read_checkpoint(path, flag: str, error: type[Exception] | None = None, hint: str = "") -> dict:
    """The dict of the pretraining checkpoint ``path`` given as ``flag`` (e.g. '--resume'); ``error`` (default
    PretrainError) with one line naming the flag and file when it is missing, unreadable or of another format
    (``hint`` is appended to that last message)."""
    error = error or PretrainError
    path = Path(path)
    if not path.is_file():
        raise error(f"{flag} {path}: checkpoint not found")
    check_torch_file(path, flag, error)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise error(f"{flag} {path}: cannot read it as a pretraining checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise error(f"{flag} {path}: not a {CKPT_FORMAT!r} checkpoint{hint}")
    return state


def _load_resume(path, cfg: PretrainConfig) -> dict:
    state = read_checkpoint(path, "--resume", hint=" (an official SAM-Med3D checkpoint starts a run with --init, "
                                                   "not --resume)")
    missing = [k for k in ("model_state_dict", "optimizer_state_dict", "iteration", "config", "train_args")
               if k not in state]
    if missing:
        raise PretrainError(f"--resume {path}: checkpoint lacks keys {missing}")
    saved = state["train_args"]
    changed = {k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)}
    if changed:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise PretrainError(f"--resume {path}: settings differ from the interrupted run ({desc}); "
                            "a resumed run must keep them to continue the same run")
    if state["iteration"] >= (cfg.stop_at or cfg.iterations):
        flag = f"--stop_at {cfg.stop_at}" if cfg.stop_at else f"--iterations {cfg.iterations}"
        raise PretrainError(f"--resume {path}: checkpoint is at iteration {state['iteration']}, "
                            f"nothing left to do for {flag}")
    return state


# ----------------------------------------------------------------------------------------------- loop

def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or continue) a training run. Returns dict(losses list[float] per iteration since iteration 0,
    dice list[float] (last-step hard Dice per iteration of THIS invocation), iteration int, out Path)."""
    _check_settings(cfg)
    device = torch.device(cfg.device)
    resume = _load_resume(cfg.resume, cfg) if cfg.resume else None
    if resume is not None:
        config = resume["config"]
        model = build_model(config, cfg.seed, device=cfg.device)
        model.load_state_dict(resume["model_state_dict"])
    else:
        config = resolve_arch(cfg.arch, cfg.arch_config)
        model = build_model(config, cfg.seed, init=cfg.init, device=cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    start, losses = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        start, losses = int(resume["iteration"]), list(resume.get("losses", []))
        log.info("resumed %s at iteration %d", cfg.resume, start)

    stop = cfg.stop_at or cfg.iterations
    dataset = _dataset(cfg, model.img_size)
    indices = range(start * cfg.batch_size, stop * cfg.batch_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                        collate_fn=_collate, persistent_workers=False)
    bar = Progress(stop, desc="pretrain generalist", initial=start, enabled=cfg.progress)   # this run's end
    dices: list[float] = []
    t = start
    for images, targets in loader:
        images = sam_znorm(images.to(device))
        targets = targets.to(device)
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_CLICK_STREAM, t)))
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        images, targets = simulate_padding(images, targets.bool(), rng, cfg.pad_prob)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, t)
        optimizer.zero_grad(set_to_none=True)
        loss, info = interaction_loss(model, images, targets, cfg.num_clicks, generator, rng, cfg.no_mask_prob)
        if not torch.isfinite(loss):
            raise PretrainError(f"loss became {loss.item()} at iteration {t}; lower --lr or check the data")
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        t += 1
        losses.append(float(loss.detach()))
        dices.append(info["dice"])
        bar.update(loss=losses[-1], dice=info["dice"])
        if t % cfg.log_every == 0:
            window = losses[-cfg.log_every:]
            log.info("iteration %d loss %.4f (mean of last %d) dice %.3f lr %.2e", t, sum(window) / len(window),
                     len(window), info["dice"], lr_at(cfg, t - 1))
        if t % cfg.save_every == 0 and t < stop:
            save_checkpoint(cfg.out, model, optimizer, t, config, cfg, losses)
        if cfg.keep_every and t % cfg.keep_every == 0:
            # a fixed point of the run for later comparison (e.g. a partly pretrained generalist)
            save_checkpoint(snapshot_path(cfg.out, t), model, optimizer, t, config, cfg, losses)
    bar.close()
    out = save_checkpoint(cfg.out, model, optimizer, t, config, cfg, losses)
    log.info("saved %s (iteration %d) and %s", out, t, config_json_path(out))
    return {"losses": losses, "dice": dices, "iteration": t, "out": out}


# ----------------------------------------------------------------------------------------------- reuse

# settings a finished checkpoint must share with a config to count as that config's model
SAME_MODEL_KEYS = ("arch", "arch_config", "init", "data", "iterations", "batch_size", "lr", "weight_decay",
                   "lr_schedule", "warmup", "clip_grad", "seed", "num_clicks", "targets_per_image", "no_mask_prob",
                   "fg_prob")


def checkpoint_status(path, cfg: PretrainConfig) -> tuple[str, str]:
    """('done' | 'partial' | 'mismatch' | 'missing', reason) of the checkpoint at ``path`` against ``cfg``:
    done = a finished run with the same settings and architecture (config JSON beside it included), at
    ``cfg.stop_at`` when that is set; partial = the same run, stopped earlier (resumable)."""
    path = Path(path)
    if not path.is_file():
        return "missing", f"{path} does not exist"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is simply not this run's checkpoint
        return "mismatch", f"{path} cannot be read ({type(err).__name__}: {err})"
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        return "mismatch", f"{path} is not a {CKPT_FORMAT!r} checkpoint"
    saved = ckpt.get("train_args", {})
    diff = [f"{k} {saved.get(k)!r} (want {getattr(cfg, k)!r})" for k in SAME_MODEL_KEYS
            if saved.get(k) != getattr(cfg, k)]
    if ckpt.get("config") != resolve_arch(cfg.arch, cfg.arch_config):
        diff.append(f"architecture config differs from {cfg.arch_config or cfg.arch!r}")
    if diff:
        return "mismatch", f"{path} was trained with " + ", ".join(diff)
    json_path = config_json_path(path)
    if not json_path.is_file() or json.loads(json_path.read_text()) != ckpt["config"]:
        return "mismatch", f"{json_path} is missing or differs from the checkpoint's architecture"
    end = cfg.stop_at or cfg.iterations        # a run asked to stop early is finished there
    if int(ckpt.get("iteration", -1)) < end:
        return "partial", f"{path} stopped at iteration {ckpt.get('iteration')} of {end}"
    return "done", f"{path} holds a finished run with these settings"


def ensure_pretrained(cfg: PretrainConfig, say=log.info) -> dict:
    """The finished checkpoint of ``cfg`` at ``cfg.out``: reused when :func:`checkpoint_status` is 'done',
    resumed when 'partial', else trained from scratch. ``say(message)`` reports which and why. Returns
    dict(action 'reused' | 'resumed' | 'trained', and for a run: final_loss and final_click_dice, the means
    over its last tenth)."""
    status, reason = checkpoint_status(cfg.out, cfg)
    if status == "done":
        say(f"reusing {cfg.out} ({reason})")
        return dict(action="reused")
    if status == "partial":
        say(f"{reason}; resuming it")
        cfg = dataclasses.replace(cfg, resume=str(cfg.out))
    else:
        length = (f"the first {cfg.stop_at} iterations of a {cfg.iterations}-iteration schedule" if cfg.stop_at
                  else f"{cfg.iterations} iterations")
        say(f"{reason}; pretraining {cfg.arch} for {length} -> {cfg.out}")
    result = pretrain(cfg)
    tenth = max(1, len(result["losses"]) // 10)
    dice = result["dice"][-max(1, len(result["dice"]) // 10):]
    return dict(action="resumed" if cfg.resume else "trained", final_loss=float(np.mean(result["losses"][-tenth:])),
                final_click_dice=float(np.mean(dice)) if dice else None)
