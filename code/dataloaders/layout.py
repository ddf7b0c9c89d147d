"""The LA data layout on disk (UA-MT's ``data/``), named once for every reader and writer of it::

    <root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5   # image float32 (X,Y,Z), label uint8 {0,1} (X,Y,Z)
    <root>/train.list, <root>/test.list                  # case names, one per line

Also where the repository is: the scripts' default paths (``../data/...``, ``../model``, ``../ckpt/...``) are
written relative to ``code/`` and resolved by :func:`repo_default`, so ``python code/train_LA_mt.py`` from the
repository root and ``python train_LA_mt.py`` from ``code/`` read and write the same folders. A path the user
types stays relative to the working directory, as on any command line.

No heavy imports, so data writers (phantoms, the raw-data converter) can use it without torch.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TRAINING_FOLDER", "H5_NAME", "DEFAULT_ROOT", "CODE_DIR", "REPO_ROOT", "dataset_paths", "repo_default"]

CODE_DIR = Path(__file__).resolve().parents[1]    # code/: the folder the scripts' default paths start from
REPO_ROOT = CODE_DIR.parent

TRAINING_FOLDER = "2018LA_Seg_Training Set"    # the folder of case folders under the dataset root
H5_NAME = "mri_norm2.h5"                      # each case's file inside its folder
DEFAULT_ROOT = f"../data/{TRAINING_FOLDER}"   # the case folder as the scripts in code/ see it by default


def repo_default(path: str | os.PathLike | None) -> str | None:
    """A default path written relative to ``code/`` (e.g. ``../model``) as a path that works from the current
    working directory: relative to it when it lies inside the repository (so from ``code/`` the default reads
    exactly as written), else absolute. Absolute paths and None pass unchanged."""
    if path is None or os.path.isabs(path):
        return path
    target = os.path.normpath(CODE_DIR / path)
    cwd = os.getcwd()
    inside = os.path.commonpath([cwd, str(REPO_ROOT)]) == str(REPO_ROOT)
    return os.path.relpath(target, cwd) if inside else target


def dataset_paths(root) -> dict | None:
    """{'root_path': case folder, 'train_list', 'test_list'} (strings) of the dataset at ``root`` in this layout,
    or None when one of the three is missing."""
    root = Path(root)
    paths = dict(root_path=root / TRAINING_FOLDER, train_list=root / "train.list", test_list=root / "test.list")
    if not (paths["root_path"].is_dir() and paths["train_list"].is_file() and paths["test_list"].is_file()):
        return None
    return {k: str(v) for k, v in paths.items()}
