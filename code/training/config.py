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
threads                    0: the cores left idle by the    ours (torch's default takes every core, which
                           1-minute load average            a loaded machine makes many times slower)
tune_malloc                auto: after the first step, on   ours (the tuning keeps freed memory: faster on
                           when MemAvailable >= its peak    CPU, higher peak; training.run.malloc_auto_decision)
paths                      ../data, ../model, ../ckpt       relative to code/, from any working directory
                                                            (dataloaders.layout.repo_default)
=========================  ===============================  =================================================
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dataloaders.layout import repo_default
from utils.errors import ConfigError
from utils.generalist import GEOMETRIES, PROMPTS

AMP_MODES = ("none", "bf16")


@dataclass
class TrainConfig:
    """Every setting of a training run (serialised to config.json and into train_state.pth)."""
    # data
    root_path: str = "../data/2018LA_Seg_Training Set/"
    train_list: Optional[str] = None          # None -> <root_path>/../train.list
    labeled_num: int = 16
    # a folder written by prepare_dataset.py: root_path, train_list, num_classes and (unless given) labeled_num
    # come from it (``apply_dataset``); None: LA's h5 layout, 2 classes
    dataset: Optional[str] = None
    num_classes: int = 2
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
    # method parts (chosen by name from the registries of training.parts, filled by training.methods): the
    # field and flag 'specialist' name a CONSISTENCY_TERMS entry (the name the README and scripts use)
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
    # glibc: keep freed memory for reuse (training.run.tune_malloc). None = auto: decided after the first
    # training step, on only where the machine's available memory leaves room for what it keeps
    # (training.run.malloc_auto_decision), since the memory it holds made runs peak above the official code's
    tune_malloc: Optional[bool] = None
    threads: int = 0                          # torch CPU threads; 0: the cores left idle by the current load
    resume: Optional[str] = None              # path, or 'auto' -> <snapshot>/train_state.pth
    # start afresh in a run folder that holds another run's files, moving them to <run>/previous_<UTC time>/
    overwrite: bool = False
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
        return dict(n_channels=1, n_classes=self.num_classes, n_filters=self.n_filters, normalization="batchnorm",
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
        """Raise ``ConfigError`` (a ValueError) naming the setting when the combination is unusable; returns self."""
        # local import: the registries live with the methods, the config only checks names against them
        from training.methods import CONSISTENCY_TERMS, GENERALIST_TERMS, SUPERVISED_LOSSES, GeneralistTerm

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.patch_size) == 3 and all(int(p) > 0 and int(p) % 16 == 0 for p in self.patch_size),
             f"patch_size must be three positive multiples of 16 (V-Net downsamples 4 times), got {self.patch_size}")
        need(1 <= self.labeled_bs <= self.batch_size,
             f"labeled_bs must be in [1, batch_size={self.batch_size}], got {self.labeled_bs}")
        need(self.labeled_num >= 1, f"labeled_num must be >= 1, got {self.labeled_num}")
        need(self.num_classes >= 2, f"num_classes must be >= 2 (background and one class), got {self.num_classes}")
        need(self.max_iterations >= 1, f"max_iterations must be >= 1, got {self.max_iterations}")
        need(self.stop_after is None or 1 <= self.stop_after <= self.max_iterations,
             f"stop_after must be in [1, max_iterations={self.max_iterations}], got {self.stop_after}")
        need(self.supervised_loss in SUPERVISED_LOSSES,
             f"supervised_loss {self.supervised_loss!r} unknown; choose from {sorted(SUPERVISED_LOSSES)}")
        need(self.specialist in CONSISTENCY_TERMS,
             f"specialist {self.specialist!r} unknown; choose from {sorted(CONSISTENCY_TERMS)}")
        need(self.generalist_term in GENERALIST_TERMS,
             f"generalist term {self.generalist_term!r} unknown; choose from {sorted(GENERALIST_TERMS)}")
        need(self.prompt in PROMPTS, f"prompt {self.prompt!r} unknown; choose from {PROMPTS}")
        need(self.geometry in GEOMETRIES, f"geometry {self.geometry!r} unknown; choose from {GEOMETRIES}")
        need(self.amp in AMP_MODES, f"amp {self.amp!r} unknown; choose from {AMP_MODES}")
        uses_unlabeled = (CONSISTENCY_TERMS[self.specialist].uses_unlabeled
                          or GENERALIST_TERMS[self.generalist_term].uses_unlabeled)
        need(not uses_unlabeled or self.labeled_bs < self.batch_size,
             f"specialist {self.specialist!r} / generalist term {self.generalist_term!r} need unlabeled patches: "
             f"labeled_bs ({self.labeled_bs}) must be < batch_size ({self.batch_size})")
        need(not issubclass(GENERALIST_TERMS[self.generalist_term], GeneralistTerm) or len(self.generalist) >= 1,
             f"generalist term {self.generalist_term!r} needs at least one --generalist checkpoint")
        need(self.uamt_passes >= 1, f"uamt_passes must be >= 1, got {self.uamt_passes}")
        need(0 <= self.checkpoint_levels <= 5, f"checkpoint_levels must be in 0..5, got {self.checkpoint_levels}")
        need(self.num_clicks >= 1, f"num_clicks must be >= 1, got {self.num_clicks}")
        need(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")
        need(self.val_every >= 0, f"val_every must be >= 0, got {self.val_every}")
        need(self.val_every == 0 or self.val_list is not None, "val_every > 0 needs --val_list")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.threads >= 0,
             f"threads must be >= 0 (0: the cores left idle by the current load), got {self.threads}")
        need(not (self.overwrite and self.resume is not None),
             "--overwrite starts afresh and --resume continues: choose one")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# settings holding one path (besides the generalist checkpoints and a JSON --generalist_arch)
PATH_FIELDS = ("root_path", "train_list", "dataset", "model_dir", "val_list")


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {text!r}")


def _bool_or_auto(text: str) -> Optional[bool]:
    return None if str(text).lower() == "auto" else _bool(text)


def _choices_help(what: str, registry) -> str:
    """Help text listing a registry's names with the first line of each class's docstring."""
    return f"{what}, one of: " + registry.describe().replace("%", "%%")


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line of every ``train_LA_*.py`` script; ``defaults`` (the script's SETTINGS) fill it.

    One flag per ``TrainConfig`` field (``--stop_after`` is hidden), each with help text, so ``-h`` shows every
    default (the script's, where it sets one); ``--print_config`` prints the resolved settings and exits."""
    from training.methods import CONSISTENCY_TERMS, GENERALIST_TERMS, SUPERVISED_LOSSES
    p = argparse.ArgumentParser(description="Semi-supervised LA segmentation (SemiSAM / UA-MT family).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Default paths name the repository's data/, model/ and ckpt/ folders from "
                                       "any working directory; paths you give are relative to the working "
                                       "directory. Interrupting a run (Ctrl-C, SIGTERM) saves a resumable state "
                                       "and prints the command that continues it.")
    a = p.add_argument
    g = p.add_argument_group("data").add_argument
    g("--root_path", type=str, help="folder of case folders (UA-MT layout)")
    g("--train_list", type=str, help="training case list (None: <root_path>/../train.list)")
    g("--labeled_num", type=int, help="the first labeled_num cases of the list are labeled, the rest unlabeled "
                                     "(with --dataset: its labeled training cases, unless given)")
    g("--dataset", type=str, help="a folder written by prepare_dataset.py (sets --root_path, --train_list, "
                                  "--num_classes and the labeled count; None: LA's layout)")
    g("--num_classes", type=int, help="output classes, background included (with --dataset: from its dataset.json)")
    g("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="training patch (multiples of 16)")
    g("--batch_size", type=int, help="patches per step, labeled and unlabeled")
    g("--labeled_bs", type=int, help="labeled patches per step (the first rows of the batch)")
    g("--num_workers", type=int, help="DataLoader worker processes")
    g("--cache", type=_bool, help="decode the cases once into memory at the start")
    g = p.add_argument_group("output").add_argument
    g("--exp", type=str, help="experiment name; outputs go to <model_dir>/<exp>/")
    g("--model_dir", type=str, help="parent folder of experiment outputs")
    g("--save_every", type=int, help="write iter_N.pth and train_state.pth every N iterations")
    g("--image_every", type=int, help="TensorBoard image slices every N iterations (0: never)")
    g("--log_every", type=int, help="log.txt loss line every N iterations (0: never)")
    g("--progress", type=_bool, help="tqdm progress bar")
    g("--print_config", action="store_true",
      help="print the resolved settings as JSON and exit (reads no data, writes no file)")
    g = p.add_argument_group("optimisation").add_argument
    g("--max_iterations", type=int, help="training steps")
    g("--base_lr", type=float, help="SGD learning rate before the first step decay")
    g("--lr_step", type=int, help="the learning rate is multiplied by lr_gamma every lr_step iterations")
    g("--lr_gamma", type=float, help="learning-rate decay factor")
    g("--momentum", type=float, help="SGD momentum")
    g("--weight_decay", type=float, help="SGD weight decay")
    g("--seed", type=int, help="seed of every random stream (offset by the rank)")
    g("--deterministic", type=_bool, help="cudnn.deterministic and no cudnn.benchmark (UA-MT default 1)")
    g = p.add_argument_group("network").add_argument
    g("--n_filters", type=int, help="V-Net base channel count")
    g("--has_dropout", type=_bool, help="V-Net dropout (UA-MT: on; it makes the teacher passes stochastic)")
    g = p.add_argument_group("method parts (names from the registries of training.methods)").add_argument
    # no argparse choices: an unknown name is refused by TrainConfig.validate, which also checks names given
    # in a script's SETTINGS or a config.json
    g("--supervised_loss", type=str, help=_choices_help("supervised loss", SUPERVISED_LOSSES))
    g("--specialist", type=str, help=_choices_help("specialist consistency", CONSISTENCY_TERMS))
    g("--generalist_term", type=str, help=_choices_help("generalist term", GENERALIST_TERMS))
    g = p.add_argument_group("specialist consistency").add_argument
    g("--consistency", type=float, help="maximum consistency weight")
    g("--consistency_rampup", type=float, help="ramp-up length, in blocks of rampup_block iterations")
    g("--rampup_block", type=int, help="iterations per block of the consistency ramp-up and generalist ramp-down")
    g("--ema_decay", type=float, help="EMA teacher decay (alpha = min(1 - 1/(t+1), ema_decay))")
    g("--noise_std", type=float, help="teacher input noise: clamp(noise_std * N(0, 1), -noise_clip, noise_clip)")
    g("--noise_clip", type=float, help="bound of the teacher input noise")
    g("--uamt_passes", type=int, help="UA-MT stochastic teacher passes T")
    g("--uamt_passes_per_forward", type=int, help="passes batched per teacher forward (0: all)")
    g("--uamt_reuse_target", type=_bool, help="count the consistency-target pass as one of the T passes "
                                             "(0: a separate pass as in UA-MT)")
    g = p.add_argument_group("generalist").add_argument
    g("--generalist", type=str, nargs="+", help="'none' or one or more SAM-Med3D checkpoint paths")
    g("--generalist_arch", type=str, help="SAM registry name (vit_b_ori) or a JSON config file")
    g("--prompt", type=str, choices=PROMPTS, help="how the student's foreground probability prompts SAM")
    g("--num_clicks", type=int, help="clicks of the point prompt")
    g("--geometry", type=str, choices=GEOMETRIES, help="how a patch meets SAM's input size")
    g("--sam_weight", type=float, help="maximum generalist-term weight (ramped down)")
    g("--sam_rampdown", type=float, help="ramp-down length, in blocks of rampup_block iterations")
    g = p.add_argument_group("runtime").add_argument
    g("--device", type=str, help="auto | cpu | cuda | cuda:N")
    g("--amp", type=str, choices=AMP_MODES, help="autocast dtype for the forward passes (losses stay fp32)")
    g("--channels_last", type=_bool_or_auto,
      help="channels_last_3d memory format: 1 | 0 | auto (on for CPU and CUDA)")
    g("--checkpoint_levels", type=int, help="V-Net activation checkpointing: resolution levels recomputed in "
                                           "backward (0 off, 1 full resolution, 2 also half; saves memory)")
    g("--tune_malloc", type=_bool_or_auto,
      help="glibc mallopt: reuse freed memory instead of returning it to the OS (faster on CPU, holds more "
           "memory): 1 | 0 | auto (after the first step, on when MemAvailable is at least that step's peak; "
           "the log says which)")
    g("--threads", type=int, help="torch CPU threads (0: the cores left idle by the current load)")
    g("--resume", type=str, nargs="?", const="auto",
      help="continue from a train_state.pth (no value: <model_dir>/<exp>/train_state.pth)")
    g("--overwrite", type=_bool, nargs="?", const=True,
      help="start afresh in a run folder that holds another run's files: they move to "
           "<run>/previous_<UTC time>/ (nothing is deleted); without it such a folder is refused")
    g = p.add_argument_group("validation (optional best-model selection)").add_argument
    g("--val_list", type=str, help="validation case list (enables best_model.pth selection)")
    g("--val_every", type=int, help="validate every N iterations (0: never)")
    g("--val_stride_xy", type=int, help="validation sliding-window stride along X and Y")
    g("--val_stride_z", type=int, help="validation sliding-window stride along Z")
    a("--stop_after", type=int, help=argparse.SUPPRESS)

    merged = resolve_default_paths({name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                                    for name, f in _FIELDS.items()})
    unknown = sorted(set(defaults or {}) - set(_FIELDS))
    if unknown:
        raise KeyError(f"unknown training settings {unknown}; known: {sorted(_FIELDS)}")
    merged.update(defaults or {})
    for name in ("channels_last", "tune_malloc"):
        if merged[name] is None:
            # shown as 'auto' by -h; argparse passes a string default through the flag's type: None again
            merged[name] = "auto"
    p.set_defaults(**merged)
    return p


def resolve_default_paths(values: dict) -> dict:
    """A copy of ``values`` (TrainConfig fields) with its paths, written relative to ``code/`` as the field
    defaults and the entry scripts' SETTINGS are, resolved so that they name the same place from any working
    directory (``dataloaders.layout.repo_default``). Flags are not passed through it: a path typed on the
    command line stays relative to the working directory, and so does one a caller of ``training.run.main``
    computed itself (the demo)."""
    out = dict(values)
    for name in PATH_FIELDS:
        if name in out:
            out[name] = repo_default(out[name])
    if out.get("generalist"):
        out["generalist"] = [g if g == "none" else repo_default(g) for g in out["generalist"]]
    if str(out.get("generalist_arch", "")).endswith(".json"):
        out["generalist_arch"] = repo_default(out["generalist_arch"])
    return out


def parse_config(defaults: dict | None = None, argv: Sequence[str] | None = None) -> TrainConfig:
    """Script ``defaults`` overridden by ``argv`` flags -> validated ``TrainConfig``.

    With ``--print_config`` the resolved settings are printed as JSON (``TrainConfig.to_dict``) and
    ``SystemExit(0)`` is raised, as ``-h`` does, before anything reads data or writes a file."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    ns = build_parser(defaults).parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k in _FIELDS}
    if values.get("dataset"):
        apply_dataset(values, explicit_flags(defaults, argv))
    values["patch_size"] = tuple(int(v) for v in values["patch_size"])
    gens = [str(g) for g in (values["generalist"] or [])]
    if gens == ["none"]:
        # '--generalist none' switches the generalist off, whatever the script's term
        gens, values["generalist_term"] = [], "none"
    values["generalist"] = gens
    cfg = TrainConfig(**values).validate()
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        raise SystemExit(0)
    return cfg


def explicit_flags(defaults: dict | None, argv: Sequence[str]) -> set[str]:
    """The settings ``argv`` names explicitly (abbreviations included), as opposed to defaults."""
    unset = object()       # not a string: argparse passes it through without the flag's type conversion
    p = build_parser(defaults)
    p.set_defaults(**{name: unset for name in _FIELDS})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not unset and k in _FIELDS}


def apply_dataset(values: dict, explicit: set[str]) -> None:
    """Fill ``values`` from the prepared dataset ``values['dataset']``: root_path (``<dataset>/cases``),
    train_list and num_classes always, labeled_num (its labeled training cases) unless given on the command
    line (scripts' LA defaults do not count). Raises ConfigError naming the file when it is not a prepared
    dataset."""
    folder = Path(values["dataset"])
    path = folder / "dataset.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--dataset {folder}: no dataset.json (a folder written by prepare_dataset.py)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if info.get("format") != "semisam_prepared_dataset":
        raise ConfigError(f"{path}: not written by prepare_dataset.py (no 'format': 'semisam_prepared_dataset')")
    if "root_path" not in explicit:
        values["root_path"] = str(folder / "cases")
    if "train_list" not in explicit:
        values["train_list"] = str(folder / "train.list")
    if "num_classes" in explicit and values["num_classes"] != info["num_classes"]:
        raise ConfigError(f"--num_classes {values['num_classes']} contradicts {path} ({info['num_classes']} "
                          f"classes: {info['class_names']})")
    values["num_classes"] = int(info["num_classes"])
    if "labeled_num" not in explicit:
        values["labeled_num"] = int(info["n_labeled_train"])


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
