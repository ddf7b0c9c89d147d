"""Checkpoint files: crash-safe writes, safe reading, wrapper-prefix stripping and the strict-load report.

Every model file of the project goes through here: the V-Net's ``iter_N.pth`` / ``best_model.pth`` /
``train_state.pth`` (``training.engine``, read back by ``utils.inference.load_specialist``) and the SAM-Med3D
generalists (written by ``training.pretrain``, read by ``networks.sam_med3d.checkpoint``); the data writers
(``dataloaders.phantoms``, ``dataloaders.la_heart_processing``) use :func:`atomic_write` for their h5 files.
torch is imported only where a function needs it, so those writers do not load it.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["TRAIN_STATE_FORMAT", "WRAPPER_PREFIXES", "CheckpointReadError", "KeyReport", "atomic_save", "atomic_write",
           "check_torch_file", "compare_state_dict", "file_digest", "file_sha256", "is_torch_file", "read_checkpoint",
           "strip_wrapper_prefixes"]

log = logging.getLogger(__name__)

# The 'format' entry of a train_state.pth (written by training.engine through training.state, recognised by
# utils.inference.load_specialist, which takes the student weights out of it).
TRAIN_STATE_FORMAT = "semisam_train_state"

# Key prefixes that wrappers add to a state dict: DataParallel / DDP ('module.'), torch.compile ('_orig_mod.').
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (callers may raise their own subclass of ValueError instead)."""


# ----------------------------------------------------------------------------------------------- writing
def _serialize(obj: Any, fileobj) -> None:
    """The serializer behind :func:`atomic_save` (a module attribute so a test can make it fail mid-write)."""
    import torch
    torch.save(obj, fileobj)


def atomic_write(path: os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` so that a crash leaves either the old or the new ``path``, never half of one.

    ``write`` creates the file it is given (a temporary name in the same folder; any writer that takes a path,
    e.g. ``h5py.File(tmp_path, 'w')``). Its bytes are then fsync'ed and the file ``os.replace``d onto ``path``
    (atomic on POSIX within one file system); the folder is fsync'ed so the rename itself survives a power
    loss. A writer that raises leaves ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:      # fsync needs a descriptor of the file itself
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not let a folder be opened; the rename already happened
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: os.PathLike, serializer: Optional[Callable[[Any, Any], None]] = None) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write` (``serializer(obj, fileobj)`` replaces torch.save)."""
    write = serializer or _serialize

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(obj, f)
    return atomic_write(path, to_file)


# ----------------------------------------------------------------------------------------------- reading
# torch.save's legacy (pre-1.6) format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2)
_LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def file_digest(path: os.PathLike, algorithm: str = "sha256") -> str:
    """The ``hashlib`` digest (hex) of a file's bytes, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes: what identifies a released or cached model."""
    return file_digest(path, "sha256")


def is_torch_file(path: os.PathLike) -> bool:
    """Whether ``path`` is in one of torch.save's formats: a zip archive holding ``<name>/data.pkl`` (since
    torch 1.6) or the legacy pickle stream that opens with torch's magic number. Reads the header only. A file
    that is neither is no checkpoint at all, and torch.load's own error for it (advice to retry with
    ``weights_only=False``) would mislead."""
    import zipfile
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(name.endswith("data.pkl") for name in z.namelist())
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_TORCH_HEADER)) == _LEGACY_TORCH_HEADER
    except (OSError, zipfile.BadZipFile):
        return False


def check_torch_file(path: os.PathLike, what: str = "checkpoint",
                     error: type[Exception] = CheckpointReadError) -> None:
    """Raise ``error`` (one line naming the file) when an existing ``path`` is not a PyTorch file at all."""
    path = Path(path)
    if path.is_file() and not is_torch_file(path):
        raise error(f"cannot read {what} {path}: it is not a PyTorch checkpoint (neither torch.save's zip format "
                    f"nor its legacy format; {path.stat().st_size} bytes): check the path, or whether the download "
                    f"or copy was cut short")


def read_checkpoint(path: os.PathLike, *, allow_pickle: bool = False, what: str = "checkpoint",
                    refusal_hint: str = "", error: type[Exception] = CheckpointReadError) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``, with the file named in every failure.

    A file holding pickled non-tensor objects (an optimizer's hyper-parameters are fine, an
    ``argparse.Namespace`` is not) cannot be read safely: with ``allow_pickle`` it is re-read with
    ``weights_only=False`` and a warning is logged (unpickling can run arbitrary code, so only for a file the
    user named); without, ``error`` is raised (``refusal_hint`` appended to its message). An unreadable file
    raises ``error`` too; ``what`` names the kind of file in messages.
    """
    import torch
    path = Path(path)
    check_torch_file(path, what, error)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise error(f"{what} {path} holds non-tensor objects (e.g. optimizer state or an argparse Namespace) "
                        f"and cannot be read with torch.load(weights_only=True){refusal_hint} "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
        log.warning(
            "%s cannot be read with torch.load(weights_only=True) (it holds non-tensor objects such as an "
            "argparse Namespace); re-reading it with weights_only=False because you named this file. "
            "Unpickling can run arbitrary code: only do this with checkpoints you trust.", path)
    except Exception as err:  # noqa: BLE001 - corrupt / not a torch file: report which file
        raise error(f"cannot read {what} {path}: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise error(f"cannot read {what} {path}: {err}") from err


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict:
    """A copy of ``state`` without the key prefixes wrappers add (:data:`WRAPPER_PREFIXES`).

    A prefix is stripped only when every key carries it, so a model whose own first module is called
    ``module`` keeps its names. Applied in order, so ``module._orig_mod.`` goes too.
    """
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------- strict loading
@dataclass(frozen=True)
class KeyReport:
    """How a state dict differs from a model's: key names, and ``name [checkpoint shape] (model [shape])``."""
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    wrong_shape: list = field(default_factory=list)
    not_tensor: list = field(default_factory=list)
    limit: int = 10            # names listed per kind in messages; the rest are counted

    def __bool__(self) -> bool:
        """True when the state dict does NOT fit (some kind of mismatch was found)."""
        return bool(self.missing or self.unexpected or self.wrong_shape or self.not_tensor)

    def __str__(self) -> str:
        parts = [self._listing(title, items) for title, items in
                 (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                  ("keys with wrong shapes", self.wrong_shape), ("non-tensor entries", self.not_tensor)) if items]
        return "; ".join(parts) if parts else "all keys fit"

    def _listing(self, title: str, items: list) -> str:
        more = f", ... ({len(items) - self.limit} more)" if len(items) > self.limit else ""
        return f"{len(items)} {title}: {', '.join(items[:self.limit])}{more}"


def compare_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> KeyReport:
    """What ``model.load_state_dict(state, strict=True)`` would object to, all kinds at once.

    ``expected``: the model's ``state_dict()``; ``state``: the checkpoint's (prefixes already stripped).
    Names keep the model's order (missing, wrong shapes) or the checkpoint's (unexpected, non-tensor).
    """
    import torch

    def shape(t) -> list:
        return list(t.shape)
    return KeyReport(
        missing=[k for k in expected if k not in state],
        unexpected=[k for k in state if k not in expected],
        wrong_shape=[f"{k} {shape(state[k])} (model {shape(v)})" for k, v in expected.items()
                     if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape],
        not_tensor=[k for k in state if k in expected and not isinstance(state[k], torch.Tensor)])
