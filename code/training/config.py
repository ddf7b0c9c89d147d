"""Training configuration: one dataclass, one argument parser, script defaults layered under the flags.

Precedence: ``TrainConfig`` field defaults < the entry script's ``SETTINGS`` dict < command-line flags.

Defaults and where they come from ("paper" = the published code/paper says so; "ours" = our assumption):

=========================  ===============================  =================================================
setting                    default                          source
=========================  ===============================  =================================================
max_iterations             6000                             paper (UA-MT train_LA.py, SemiSAM)
batch_size / labeled_bs    4 / 2                            paper (UA-MT, SemiSAM)
patch_size                 112 x 112 x 80                   paper (UA-MT); SemiSAM's LA script: 128^3
base_lr, momentum, wd      0.01, 0.9, 1e-4                  paper (UA-MT SGD)
lr schedule                base_lr * 0.1 ** (t // 2500)     paper (UA-MT)
seed                       1337                             paper (UA-MT)
deterministic              on (cudnn.deterministic)         paper (UA-MT --deterministic 1)
V-Net                      n_filters 16, batchnorm,         paper (UA-MT create_model)
                           has_dropout=True
labeled_num                16 (UA-MT/MT/sup), 4 (SemiSAM)   paper (UA-MT 16/80; SemiSAM --label_num 4)
unlabeled cases            all other cases of train_list     ours (official hard-codes range(16, 80): defect 9)
consistency, rampup        0.1, 40 (in blocks of 150 its)   paper (UA-MT)
ema_decay                  0.99, alpha = min(1-1/(t+1), .99) paper (UA-MT)
teacher noise              clamp(0.1 N(0,1), -0.2, 0.2)     paper (UA-MT)
uamt passes T              8                                paper (UA-MT)
uamt target pass           one of the T passes              ours (UA-MT: a separate 9th pass; same distribution;
                                                            --uamt_reuse_target 0 restores it)
sam_weight, rampdown       0.1, 40 (blocks of 150)          ramp-down shape: SemiSAM script; the value 0.1
                                                            is our assumption (not verified in its code)
prompt / clicks            point, 10                        paper (SemiSAM)
generalist checkpoint      ../ckpt/sam_med3d.pth vit_b_ori  paper (SemiSAM script)
SemiSAM+ defaults          mt + 'unc' prompt, sam_med3d and ours (SemiSAM+ combines several generalists;
                           sam_med3d_turbo                  the exact LA recipe is not in one script)
sup baseline               batch 4 / labeled_bs 2; the 2    ours (same labeled patches per step as the
                           unlabeled rows are never loaded  semi-supervised runs; the network, BatchNorm
                                                            included, never sees an unlabeled scan)
validation                 off (last checkpoint)            paper protocol; --val_list/--val_every optional
save_every                 1000                             paper (UA-MT saves iter_N every 1000)
channels_last / cache      auto (CPU, CUDA) / on            ours (speed; same maths, results/README.md)
=========================  ===============================  =================================================
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from utils.generalist import GEOMETRIES, PROMPTS

AMP_MODES = ("none", "bf16")


@dataclass
class TrainConfig:
    """Every setting of a training run (serialised to config.json and into train_state.pth)."""
    # data
    root_path: str = "../data/2018LA_Seg_Training Set/"
    train_list: Optional[str] = None          # None -> <root_path>/../train.list
    labeled_num: int = 16
    patch_size: tuple = (112, 112, 80)
    batch_size: int = 4
    labeled_bs: int = 2
    num_workers: int = 4
    # decode every used case once, before the workers fork (they share it): decoding the gzip-compressed h5
    # files at every read was a visible share of a bf16 step on CPU (results/history.md, "Second pass", item 2);
    # costs the decoded arrays' memory (an LA case is about 10 MB of float32)
    cache: bool = True
    # output
    exp: str = "LA/experiment"
    model_dir: str = "../model"
    save_every: int = 1000
    image_every: int = 50
    log_every: int = 1
    progress: bool = True
    # optimisation
    max_iterations: int = 6000
    base_lr: float = 0.01
    lr_step: int = 2500
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 1337
    deterministic: bool = True
    # network
    n_filters: int = 16
    has_dropout: bool = True
    # method parts (chosen by name from training.methods registries)
    supervised_loss: str = "ce_dice"
    specialist: str = "mt"
    generalist_term: str = "none"
    # specialist consistency
    consistency: float = 0.1
    consistency_rampup: float = 40.0
    rampup_block: int = 150
    ema_decay: float = 0.99
    noise_std: float = 0.1
    noise_clip: float = 0.2
    uamt_passes: int = 8
    # UA-MT runs 2 passes per teacher forward; the teacher is in train mode, so its BatchNorm batch
    # statistics depend on this grouping. 0 batches all T passes into one forward (faster on GPUs).
    uamt_passes_per_forward: int = 2
    # the single noisy teacher pass that gives the consistency target also counts as one of the T passes (T - 1
    # extra passes): the same distribution (fresh noise and dropout, train-mode teacher). UA-MT ran it
    # separately (False), i.e. T + 1 teacher passes per step.
    uamt_reuse_target: bool = True
    # generalist
    generalist: list = field(default_factory=list)   # checkpoint paths; [] = no generalist
    generalist_arch: str = "vit_b_ori"                # registry name or JSON config file
    prompt: str = "point"
    num_clicks: int = 10
    geometry: str = "pad"
    sam_weight: float = 0.1
    sam_rampdown: float = 40.0
    # runtime
    device: str = "auto"
    amp: str = "none"
    # None = auto: channels_last_3d on CPU and CUDA, where a training step measured faster in that layout
    # (oneDNN: results/history.md, "Second pass", item 1; cuDNN on an H100: results/history.md, "First GPU
    # pass", item 1)
    channels_last: Optional[bool] = None
    # V-Net resolution levels recomputed in backward instead of stored (0 off; 1 full resolution; 2 also half):
    # each level lowers the peak memory of the student's forward + backward, at the price of recomputing it
    # (results/history.md, "Numbers moved out of code comments")
    checkpoint_levels: int = 0
    tune_malloc: bool = True                  # glibc: keep freed memory for reuse (training.run.tune_malloc)
    resume: Optional[str] = None              # path, or 'auto' -> <snapshot>/train_state.pth
    stop_after: Optional[int] = None          # hidden: stop (and save state) after this many iterations
    # optional validation-based selection
    val_list: Optional[str] = None
    val_every: int = 0
    val_stride_xy: int = 18
    val_stride_z: int = 4

    # ---------------------------------------------------------------- derived values
    @property
    def snapshot_path(self) -> Path:
        """Output folder ``<model_dir>/<exp>``."""
        return Path(self.model_dir) / self.exp

    @property
    def train_list_path(self) -> Path:
        """The training case list (default ``<root_path>/../train.list``, UA-MT's layout)."""
        if self.train_list:
            return Path(self.train_list)
        return Path(self.root_path).parent / "train.list"

    @property
    def vnet_kwargs(self) -> dict:
        """Constructor kwargs of the student/teacher ``VNet`` (stored in train_state['config']['vnet'])."""
        return dict(n_channels=1, n_classes=2, n_filters=self.n_filters, normalization="batchnorm",
                    has_dropout=self.has_dropout)

    @property
    def unlabeled_bs(self) -> int:
        return self.batch_size - self.labeled_bs

    def to_dict(self) -> dict:
        """Plain-Python dict (JSON-serialisable) with the derived V-Net kwargs under 'vnet'."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["generalist"] = list(self.generalist)
        d["vnet"] = self.vnet_kwargs
        d["train_list"] = str(self.train_list_path)
        return d

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the setting when the combination is unusable; returns self."""
        # local import: the registries live with the methods, the config only checks names against them
        from training.methods import GENERALIST_TERMS, SPECIALISTS, SUPERVISED_LOSSES

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(len(self.patch_size) == 3 and all(int(p) > 0 and int(p) % 16 == 0 for p in self.patch_size),
             f"patch_size must be three positive multiples of 16 (V-Net downsamples 4 times), got {self.patch_size}")
        need(1 <= self.labeled_bs <= self.batch_size,
             f"labeled_bs must be in [1, batch_size={self.batch_size}], got {self.labeled_bs}")
        need(self.labeled_num >= 1, f"labeled_num must be >= 1, got {self.labeled_num}")
        need(self.max_iterations >= 1, f"max_iterations must be >= 1, got {self.max_iterations}")
        need(self.stop_after is None or 1 <= self.stop_after <= self.max_iterations,
             f"stop_after must be in [1, max_iterations={self.max_iterations}], got {self.stop_after}")
        need(self.supervised_loss in SUPERVISED_LOSSES,
             f"supervised_loss {self.supervised_loss!r} unknown; choose from {sorted(SUPERVISED_LOSSES)}")
        need(self.specialist in SPECIALISTS,
             f"specialist {self.specialist!r} unknown; choose from {sorted(SPECIALISTS)}")
        need(self.generalist_term in GENERALIST_TERMS,
             f"generalist term {self.generalist_term!r} unknown; choose from {sorted(GENERALIST_TERMS)}")
        need(self.prompt in PROMPTS, f"prompt {self.prompt!r} unknown; choose from {PROMPTS}")
        need(self.geometry in GEOMETRIES, f"geometry {self.geometry!r} unknown; choose from {GEOMETRIES}")
        need(self.amp in AMP_MODES, f"amp {self.amp!r} unknown; choose from {AMP_MODES}")
        uses_unlabeled = self.specialist != "none" or self.generalist_term != "none"
        need(not uses_unlabeled or self.labeled_bs < self.batch_size,
             f"specialist {self.specialist!r} / generalist term {self.generalist_term!r} need unlabeled patches: "
             f"labeled_bs ({self.labeled_bs}) must be < batch_size ({self.batch_size})")
        need(self.generalist_term == "none" or len(self.generalist) >= 1,
             f"generalist term {self.generalist_term!r} needs at least one --generalist checkpoint")
        need(self.uamt_passes >= 1, f"uamt_passes must be >= 1, got {self.uamt_passes}")
        need(0 <= self.checkpoint_levels <= 5, f"checkpoint_levels must be in 0..5, got {self.checkpoint_levels}")
        need(self.num_clicks >= 1, f"num_clicks must be >= 1, got {self.num_clicks}")
        need(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")
        need(self.val_every >= 0, f"val_every must be >= 0, got {self.val_every}")
        need(self.val_every == 0 or self.val_list is not None, "val_every > 0 needs --val_list")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {text!r}")


def _bool_or_auto(text: str) -> Optional[bool]:
    return None if str(text).lower() == "auto" else _bool(text)


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line of every ``train_LA_*.py`` script; ``defaults`` (the script's SETTINGS) fill it."""
    p = argparse.ArgumentParser(description="Semi-supervised LA segmentation (SemiSAM / UA-MT family).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--root_path", type=str, help="folder of case folders (UA-MT layout)")
    a("--train_list", type=str, help="training case list (default <root_path>/../train.list)")
    a("--exp", type=str, help="experiment name; outputs go to <model_dir>/<exp>/")
    a("--model_dir", type=str, help="parent folder of experiment outputs")
    a("--labeled_num", type=int, help="the first labeled_num cases of the list are labeled, the rest unlabeled")
    a("--max_iterations", type=int)
    a("--batch_size", type=int)
    a("--labeled_bs", type=int)
    a("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    a("--base_lr", type=float)
    a("--seed", type=int)
    a("--deterministic", type=_bool, help="cudnn.deterministic and no cudnn.benchmark (UA-MT default 1)")
    a("--n_filters", type=int)
    a("--specialist", type=str, help="specialist consistency: none | mt | uamt")
    a("--generalist_term", type=str, help="generalist loss: none | semisam | semisam_plus")
    a("--consistency", type=float, help="maximum consistency weight")
    a("--consistency_rampup", type=float, help="ramp-up length, in blocks of 150 iterations")
    a("--ema_decay", type=float)
    a("--uamt_passes", type=int, help="UA-MT stochastic teacher passes T")
    a("--uamt_passes_per_forward", type=int, help="passes batched per teacher forward (0: all)")
    a("--uamt_reuse_target", type=_bool, help="count the consistency-target pass as one of the T passes "
                                             "(default 1; 0: a separate pass as in UA-MT)")
    a("--generalist", type=str, nargs="+", help="'none' or one or more SAM-Med3D checkpoint paths")
    a("--generalist_arch", type=str, help="SAM registry name (vit_b_ori) or a JSON config file")
    a("--prompt", type=str, choices=PROMPTS)
    a("--num_clicks", type=int)
    a("--geometry", type=str, choices=GEOMETRIES, help="how a patch meets SAM's input size")
    a("--sam_weight", type=float, help="maximum generalist-term weight (ramped down)")
    a("--sam_rampdown", type=float, help="ramp-down length, in blocks of 150 iterations")
    a("--resume", type=str, nargs="?", const="auto",
      help="continue from a train_state.pth (no value: <model_dir>/<exp>/train_state.pth)")
    a("--device", type=str, help="auto | cpu | cuda | cuda:N")
    a("--amp", type=str, choices=AMP_MODES, help="autocast dtype for the forward passes (losses stay fp32)")
    a("--checkpoint_levels", type=int, help="V-Net activation checkpointing: resolution levels recomputed in "
                                           "backward (0 off, 1 full resolution, 2 also half; saves memory)")
    a("--channels_last", type=_bool_or_auto, help="channels_last_3d memory format: 1 | 0 | auto (on for CPU and CUDA)")
    a("--tune_malloc", type=_bool, help="glibc mallopt: reuse freed memory instead of returning it to the OS")
    a("--num_workers", type=int)
    a("--cache", type=_bool, help="decode the cases once into memory at the start (default 1)")
    a("--val_list", type=str, help="validation case list (enables best_model.pth selection)")
    a("--val_every", type=int, help="validate every N iterations (0: never)")
    a("--val_stride_xy", type=int, help="validation sliding-window stride along X and Y")
    a("--val_stride_z", type=int, help="validation sliding-window stride along Z")
    a("--save_every", type=int, help="write iter_N.pth and train_state.pth every N iterations")
    a("--image_every", type=int, help="TensorBoard image slices every N iterations")
    a("--log_every", type=int, help="log.txt loss line every N iterations")
    a("--progress", type=_bool, help="tqdm progress bar")
    a("--stop_after", type=int, help=argparse.SUPPRESS)

    merged = {name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for name, f in _FIELDS.items()}
    unknown = sorted(set(defaults or {}) - set(_FIELDS))
    if unknown:
        raise KeyError(f"unknown training settings {unknown}; known: {sorted(_FIELDS)}")
    merged.update(defaults or {})
    p.set_defaults(**merged)
    return p


def parse_config(defaults: dict | None = None, argv: Sequence[str] | None = None) -> TrainConfig:
    """Script ``defaults`` overridden by ``argv`` flags -> validated ``TrainConfig``."""
    ns = build_parser(defaults).parse_args(list(argv) if argv is not None else None)
    values = {k: v for k, v in vars(ns).items() if k in _FIELDS}
    values["patch_size"] = tuple(int(v) for v in values["patch_size"])
    gens = [str(g) for g in (values["generalist"] or [])]
    if gens == ["none"]:
        # '--generalist none' switches the generalist off, whatever the script's term
        gens, values["generalist_term"] = [], "none"
    values["generalist"] = gens
    return TrainConfig(**values).validate()


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of ``TrainConfig.to_dict`` (derived keys dropped)."""
    values = {k: v for k, v in d.items() if k in _FIELDS}
    values["patch_size"] = tuple(values.get("patch_size", TrainConfig.patch_size))
    return TrainConfig(**values)


def write_config_json(cfg: TrainConfig, path: os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """config.json: the full settings plus ``extra`` (e.g. the case split)."""
    payload = cfg.to_dict()
    payload.update(extra or {})
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
