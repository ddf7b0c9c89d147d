"""The LA data layout on disk (UA-MT's ``data/``), named once for every reader and writer of it::

    <root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5   # image float32 (X,Y,Z), label uint8 {0,1} (X,Y,Z)
    <root>/train.list, <root>/test.list                  # case names, one per line

No heavy imports, so data writers (phantoms, the raw-data converter) can use it without torch.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["TRAINING_FOLDER", "H5_NAME", "DEFAULT_ROOT", "dataset_paths"]

TRAINING_FOLDER = "2018LA_Seg_Training Set"    # the folder of case folders under the dataset root
H5_NAME = "mri_norm2.h5"                      # each case's file inside its folder
DEFAULT_ROOT = f"../data/{TRAINING_FOLDER}"   # the case folder as the scripts in code/ see it by default


def dataset_paths(root) -> dict | None:
    """{'root_path': case folder, 'train_list', 'test_list'} (strings) of the dataset at ``root`` in this layout,
    or None when one of the three is missing."""
    root = Path(root)
    paths = dict(root_path=root / TRAINING_FOLDER, train_list=root / "train.list", test_list=root / "test.list")
    if not (paths["root_path"].is_dir() and paths["train_list"].is_file() and paths["test_list"].is_file()):
        return None
    return {k: str(v) for k, v in paths.items()}
