"""The train_state.pth format: RNG capture/restore, reading and checking a state to resume from.

``train_state.pth`` (also in docs/design.md, section 4)::

    {'format': 'semisam_train_state', 'version': 1, 'iteration': int (completed steps),
     'student': state_dict, 'teacher': state_dict | None (no teacher without a specialist consistency),
     'optimizer': state_dict, 'config': TrainConfig.to_dict() (with 'vnet' kwargs, 'patch_size', ...),
     'rng': [per-rank RNG bundle, ...], 'sampler': {'next_batch': int, ...}, 'lr': float,
     'best': {'dice': float, 'iteration': int} | None,
     'pending_validation': bool (saved just before a validation, which a run resumed from it runs first;
                                 absent in older states: False)}

Everything in it is plain Python, tensors or OrderedDicts, so it loads with ``torch.load(weights_only=True)``
(numpy's Mersenne-Twister key is stored as a tensor for that reason).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.errors import CheckpointError, MissingFileError
from utils.io import TRAIN_STATE_FORMAT, is_torch_file

STATE_VERSION = 1


class TrainStateError(CheckpointError):
    """A train_state.pth that cannot be resumed from (wrong format, version or settings); a ValueError."""


# ------------------------------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device, generator: Optional[torch.Generator] = None) -> dict:
    """This process's RNG streams: python, numpy (global), torch CPU, torch CUDA (``device``), ``generator``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    bundle = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state() if generator is not None else None,
    }
    return bundle


def restore_rng(bundle: dict, device: torch.device, generator: Optional[torch.Generator] = None) -> None:
    """Inverse of ``capture_rng``."""
    py = bundle["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = bundle["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(bundle["torch"])
    if device.type == "cuda" and bundle.get("cuda") is not None:
        torch.cuda.set_rng_state(bundle["cuda"], device)
    if generator is not None:
        if bundle.get("generator") is None:
            raise TrainStateError("the train state has no generalist click-generator state to restore")
        generator.set_state(bundle["generator"])


# ------------------------------------------------------------------------------------------ train state
def load_train_state(path: os.PathLike) -> dict:
    """Read and check a train_state.pth; ``MissingFileError`` (a FileNotFoundError) / ``TrainStateError``
    name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no train state to resume from: {path} does not exist")
    if not is_torch_file(path):     # torch.load's own error would advise weights_only=False
        raise TrainStateError(f"{path} is not a readable train state: not a PyTorch file at all (neither "
                              f"torch.save's zip format nor its legacy format)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise TrainStateError(f"{path} is not a readable train state: {e}") from e
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise TrainStateError(f"{path} is not a train state (expected format {TRAIN_STATE_FORMAT!r}; a plain "
                              f"iter_N.pth holds only student weights and cannot be resumed)")
    if state.get("version") != STATE_VERSION:
        raise TrainStateError(f"{path} has train-state version {state.get('version')!r}; "
                              f"this code reads version {STATE_VERSION}")
    missing = [k for k in ("iteration", "student", "teacher", "optimizer", "config", "rng", "sampler")
               if k not in state]
    if missing:
        raise TrainStateError(f"{path} lacks keys {missing}")
    return state


# Settings that define the trajectory: a resume that changes one of them is a different experiment. Paths
# (data root, lists, generalist checkpoints) may move, so the case names ('cases') are compared instead.
RESUME_FIXED_KEYS = ("cases", "labeled_num", "patch_size", "batch_size", "labeled_bs",
                     "base_lr", "lr_step", "lr_gamma", "momentum", "weight_decay", "seed", "n_filters",
                     "has_dropout", "supervised_loss", "specialist", "generalist_term", "consistency",
                     "consistency_rampup", "rampup_block", "ema_decay", "noise_std", "noise_clip", "uamt_passes",
                     "prompt", "num_clicks", "geometry", "sam_weight", "sam_rampdown")


def check_resume_config(saved: dict, current: dict, path: os.PathLike) -> list[str]:
    """Raise ``TrainStateError`` listing fixed settings that differ; return the other differing keys."""
    diff = [k for k in RESUME_FIXED_KEYS if k in saved and _norm(saved[k]) != _norm(current.get(k))]
    if diff:
        detail = ", ".join(f"{k}: saved {saved[k]!r} vs now {current.get(k)!r}" for k in diff)
        raise TrainStateError(f"cannot resume from {path}: settings differ ({detail})")
    ignore = set(RESUME_FIXED_KEYS) | {"resume", "stop_after"}
    return sorted(k for k in current if k not in ignore and k in saved and _norm(saved[k]) != _norm(current[k]))


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v
