"""Loading frozen SAM-Med3D generalists from checkpoint files.

Accepted file contents (``torch.load``):

* a raw state dict ``{name: tensor}``;
* a dict holding it under ``'model_state_dict'`` (SAM-Med3D / SemiSAM, MedIM) or ``'state_dict'``, possibly
  next to optimizer state, epochs, losses and an ``argparse.Namespace`` under ``'args'`` (the original
  ``sam_med3d.pth``). Such a file cannot be read with ``weights_only=True``; because the user named it,
  it is then re-read with ``weights_only=False`` (arbitrary code could run while unpickling) and a warning
  is logged. ``allow_pickle=False`` forbids that fallback.

Keys prefixed ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) are stripped. Loading is strict; a
mismatch raises :class:`GeneralistCheckpointError` listing the missing / unexpected / wrong-shape keys
and naming the architecture tried. (Reading, prefix stripping and the key report are ``utils.io``'s, shared
with the V-Net loader.)

``sam_model_registry3D`` lives here, not in ``build``, because its builders take a checkpoint: ``build``
constructs models and knows no files, so the two modules do not import each other.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from utils.errors import GeneralistError
from utils.io import compare_state_dict, read_checkpoint, strip_wrapper_prefixes

from .build import build_sam3d_from_config, config_label, registry_names, sam3d_config
from .sam3d import Sam3D

# The repository's ckpt/ folder (code/networks/sam_med3d/checkpoint.py -> <repo>/ckpt).
CKPT_DIR = Path(__file__).resolve().parents[3] / "ckpt"

DOWNLOAD_HINT = (
    "Download SAM-Med3D weights from https://github.com/uni-medical/SAM-Med3D: sam_med3d.pth (the original "
    "model SemiSAM uses) and sam_med3d_turbo.pth (Hugging Face repo blueyo0/SAM-Med3D, "
    "https://huggingface.co/blueyo0/SAM-Med3D), and put them in the repository's ckpt/ folder "
    f"({CKPT_DIR}), e.g. ckpt/sam_med3d.pth.")

_STATE_DICT_KEYS = ("model_state_dict", "state_dict")
_LIST_LIMIT = 10

Arch = Union[str, Mapping[str, Any], os.PathLike]

_CACHE: Dict[Tuple, Sam3D] = {}


class GeneralistCheckpointError(GeneralistError):
    """A generalist checkpoint could not be read or does not fit the requested architecture (a ValueError)."""


class GeneralistCheckpointNotFoundError(GeneralistCheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (message says where to download it and where to put it)."""


def resolve_checkpoint_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """The checkpoint file for ``name_or_path``: the path itself if it exists, else a bare file name
    looked up in :data:`CKPT_DIR`. Raises :class:`GeneralistCheckpointNotFoundError`."""
    path = Path(name_or_path).expanduser()
    tried = [path]
    if path.is_file():
        return path.resolve()
    if len(path.parts) == 1:
        candidate = CKPT_DIR / path
        tried.append(candidate)
        if candidate.is_file():
            return candidate.resolve()
    raise GeneralistCheckpointNotFoundError(
        f"generalist checkpoint {str(name_or_path)!r} not found (tried {', '.join(str(t) for t in tried)}). "
        + DOWNLOAD_HINT)


def _read(path: Path, allow_pickle: Optional[bool]) -> Any:
    return read_checkpoint(path, allow_pickle=allow_pickle is not False, what="generalist checkpoint",
                           refusal_hint="; allow_pickle=False forbids unpickling it. Pass allow_pickle=True only "
                                        "for a file you trust",
                           error=GeneralistCheckpointError)


def extract_state_dict(obj: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object, prefixes stripped (see module doc)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise GeneralistCheckpointError(f"{source} holds a {type(obj).__name__}, expected a dict (state dict or "
                                        f"a dict with one of {list(_STATE_DICT_KEYS)})")
    for key in _STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    else:
        non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if non_tensor:
            raise GeneralistCheckpointError(
                f"{source} is neither a state dict nor a dict with one of {list(_STATE_DICT_KEYS)}; "
                f"top-level keys: {list(obj)[:_LIST_LIMIT]}")
    return strip_wrapper_prefixes(obj)


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], arch_label: str,
                           source: str) -> None:
    """Strict ``load_state_dict`` with a :class:`GeneralistCheckpointError` listing every kind of mismatch."""
    report = compare_state_dict(model.state_dict(), state)
    if report:
        raise GeneralistCheckpointError(
            f"{source} does not match the SAM-Med3D architecture {arch_label}: {report}. Pick the architecture "
            "the checkpoint was trained with (arch=registry name, config dict or JSON config file).")
    model.load_state_dict(state, strict=True)


def load_checkpoint_into(model: torch.nn.Module, name_or_path: Union[str, os.PathLike], arch_label: str,
                         allow_pickle: Optional[bool] = None) -> Path:
    """Resolve, read and strictly load a checkpoint into ``model``; returns the resolved path."""
    path = resolve_checkpoint_path(name_or_path)
    state = extract_state_dict(_read(path, allow_pickle), source=str(path))
    load_state_dict_strict(model, state, arch_label, source=str(path))
    return path


def _arch_config(arch: Arch) -> Tuple[dict, str, str]:
    """(config dict, label for messages, cache key) of ``arch``."""
    if isinstance(arch, Mapping):
        cfg = dict(arch)
        return cfg, config_label(cfg), json.dumps(cfg, sort_keys=True, default=str)
    if isinstance(arch, (str, os.PathLike)):
        if isinstance(arch, str) and arch in registry_names():
            return sam3d_config(arch), f"registry entry {arch!r}", f"registry:{arch}"
        path = Path(arch).expanduser()
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise GeneralistCheckpointError(f"cannot read SAM-Med3D config JSON {path}: {err}") from err
            return cfg, f"{config_label(cfg)} from {path}", json.dumps(cfg, sort_keys=True)
        raise GeneralistCheckpointError(
            f"arch {str(arch)!r} is neither a registry name ({registry_names()}) nor an existing "
            f"JSON config file")
    raise GeneralistCheckpointError(f"arch must be a registry name, a config dict or a JSON path, got "
                                    f"{type(arch).__name__}")


def arch_to_config(arch: Arch) -> dict:
    """The config dict (``build.sam3d_config`` format) of a registry name, config dict or JSON config path.

    Lets scripts record the exact architecture they used (e.g. ``--generalist_arch`` accepting a name or a
    JSON file). Raises :class:`GeneralistCheckpointError` for unknown names or unreadable files.
    """
    return _arch_config(arch)[0]


def random_generalist(arch: Arch, seed: int = 0) -> Sam3D:
    """A SAM-Med3D of architecture ``arch`` (registry name, config dict or JSON path) with random weights drawn
    from ``seed`` without touching the global torch RNG; eval mode, frozen. The floor of generalist quality in
    eval_generalist.py and study_generalist.py (the same seed gives the same weights in both)."""
    config, arch_label, _ = _arch_config(arch)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_sam3d_from_config(config)
    except ValueError as err:
        raise GeneralistCheckpointError(f"cannot build the SAM-Med3D architecture {arch_label}: {err}") from err
    model.requires_grad_(False)
    return model.eval()


def load_generalist(name_or_path: Union[str, os.PathLike], arch: Arch = "vit_b_ori", device: Union[str, torch.device] = "cpu",
                    allow_pickle: Optional[bool] = None) -> Sam3D:
    """A frozen (``requires_grad=False``), eval-mode SAM-Med3D generalist loaded from a checkpoint.

    Args:
        name_or_path: checkpoint path, or a bare file name found in the repository's ``ckpt/`` folder
            (e.g. ``'sam_med3d.pth'``).
        arch: registry name (``'vit_b_ori'``), a config dict (``build.sam3d_config`` format) or the path of
            a JSON file holding one.
        device: where the model lives.
        allow_pickle: None / True: a file that ``weights_only=True`` cannot read is re-read with
            ``weights_only=False`` (with a logged warning); False: raise instead.

    The same (file, arch, device) returns the same model object within a process (built once; the key
    includes the file's size and mtime, so a rewritten file is reloaded). Callers share that object.

    Raises:
        GeneralistCheckpointNotFoundError (a FileNotFoundError) for a missing file,
        GeneralistCheckpointError (a ValueError) for unreadable files or architecture mismatches.
    """
    path = resolve_checkpoint_path(name_or_path)
    config, arch_label, arch_key = _arch_config(arch)
    device = torch.device(device)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, arch_key, str(device))
    if key in _CACHE:
        return _CACHE[key]
    try:
        model = build_sam3d_from_config(config)
    except ValueError as err:
        raise GeneralistCheckpointError(f"cannot build the SAM-Med3D architecture {arch_label}: {err}") from err
    load_checkpoint_into(model, path, arch_label, allow_pickle=allow_pickle)
    model.requires_grad_(False)
    model = model.to(device).eval()
    _CACHE[key] = model
    return model


def clear_generalist_cache() -> None:
    """Forget the models cached by :func:`load_generalist`."""
    _CACHE.clear()


def _registry_builder(name: str) -> Callable[..., Sam3D]:
    def build(checkpoint: Optional[str] = None) -> Sam3D:
        """Build registry entry ``name``; with ``checkpoint`` load it strictly (eval mode, not frozen)."""
        model = build_sam3d_from_config(sam3d_config(name))
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint, arch_label=f"registry entry {name!r}")
        return model
    build.__name__ = f"build_sam3d_{name}"
    return build


# The official ``sam_model_registry3D``: name -> builder(checkpoint=None).
sam_model_registry3D: Dict[str, Callable[..., Sam3D]] = {name: _registry_builder(name) for name in registry_names()}
