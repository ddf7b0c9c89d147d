"""Left-atrium (LA) dataset, UA-MT transforms and a deterministic two-stream batch sampler.

Data layout (UA-MT's ``data/``; the names are ``dataloaders.layout``'s)::

    <root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5   # image float32 (X,Y,Z), label uint8 {0,1} (X,Y,Z)
    <root>/train.list, <root>/test.list                  # case names, one per line

``base_dir`` is the folder of case folders; split lists live beside it (``<base_dir>/../train.list``).

Differences from the official ``dataloaders/la_heart.py`` (UA-MT), all deliberate:

- Random transforms draw from an explicit ``np.random.Generator`` (``__call__(sample, rng)``) instead of the
  global numpy state, and the sampler hands every sample its own ``aug_seed``: a batch is a pure function of
  (seed, rank, iteration), whatever the number of DataLoader workers.
- Unlabeled scans (``withhold_labels``) never have their ``label`` dataset read, so no code path downstream can
  leak ground truth of unlabeled scans into training (the official SemiSAM script did: docs/design.md, defect 1).
- Both sampler streams are eternal, so any labeled count >= 1 works, and the unlabeled range is the rest of
  the list instead of a hard-coded 80 (docs/design.md, defect 9).
- Bad files raise :class:`LADataError` naming the case, the file and what was expected.
"""
from __future__ import annotations

import operator
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dataloaders.layout import DEFAULT_ROOT, H5_NAME
from utils.errors import DataError

__all__ = [
    "LADataError", "read_list", "list_path", "check_data_folder", "load_case", "check_case_header",
    "split_labeled", "LAHeart", "RandomRotFlip", "RandomCrop", "CenterCrop", "ToTensor", "Compose",
    "TwoStreamBatchSampler",
]


class LADataError(DataError):
    """Any bad input of the LA data layer (missing or malformed list, case folder, h5 file or content, or a
    setting it cannot use); a ValueError and a ProjectError (reported by the entry scripts in one line)."""


# ----------------------------------------------------------------------------------------------- lists

def read_list(path) -> list[str]:
    """Case names of a list file, one per line (surrounding whitespace and blank lines ignored).

    Raises LADataError when the file is missing, holds no name, or names a case twice.
    """
    path = Path(path)
    if not path.is_file():
        raise LADataError(f"list file not found: {path} (expected a text file with one case name per line)")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise LADataError(f"list file {path} is empty (expected one case name per line)")
    seen: dict[str, int] = {}
    for lineno, name in enumerate(names, 1):
        if name in seen:
            raise LADataError(f"list file {path}: case {name!r} appears twice (entries {seen[name]} and {lineno})")
        seen[name] = lineno
    return names


def list_path(base_dir, split: str) -> Path:
    """Path of a split list: a plain split name ('train', 'test', ...) maps to ``<base_dir>/../<split>.list``
    as in UA-MT; anything with a suffix or a path separator is taken as an explicit list file."""
    split = os.fspath(split)
    if split and os.sep not in split and "/" not in split and not Path(split).suffix:
        return Path(base_dir) / ".." / f"{split}.list"
    return Path(split)


def check_data_folder(base_dir) -> Path:
    """``base_dir`` as a Path; raises LADataError when it is not an existing folder (checked before the list
    beside it, so a mistyped --root_path is reported as such rather than as a missing list)."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise LADataError(f"data folder not found: {base_dir} (expected the folder of case folders "
                          f"<case>/{H5_NAME}, with the lists beside it, e.g. {DEFAULT_ROOT})")
    return base_dir


# ----------------------------------------------------------------------------------------------- h5 files

def _case_error(case: str, path, what: str) -> LADataError:
    return LADataError(f"LA case {case!r} ({path}): {what}")


def _case_file(base_dir, case: str) -> Path:
    folder = Path(base_dir) / case
    if not folder.is_dir():
        raise _case_error(case, folder, "case folder not found (expected <base_dir>/<case>/)")
    path = folder / H5_NAME
    if not path.is_file():
        raise _case_error(case, path, f"{H5_NAME} not found in the case folder")
    return path


def _open_h5(case: str, path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise _case_error(case, path, f"cannot open as HDF5 (not an HDF5 file, or truncated): {err}") from None


def _dataset(case: str, path: Path, h5: h5py.File, key: str) -> h5py.Dataset:
    if key not in h5:
        raise _case_error(case, path, f"missing dataset {key!r} (found keys {sorted(h5.keys())}; "
                                      "expected 'image' and 'label')")
    ds = h5[key]
    if not isinstance(ds, h5py.Dataset):
        raise _case_error(case, path, f"{key!r} is a {type(ds).__name__}, expected a dataset")
    if ds.dtype.kind not in "fiub":
        raise _case_error(case, path, f"dataset {key!r} has dtype {ds.dtype}, expected a numeric array")
    return ds


def _checked_datasets(case: str, path: Path, h5: h5py.File, with_label: bool):
    """Header-level validation; returns (image dataset, label dataset or None). Never decodes data.
    With ``with_label=False`` the ``label`` object of the file is not even looked up."""
    image = _dataset(case, path, h5, "image")
    if image.ndim != 3:
        raise _case_error(case, path, f"image has shape {image.shape}, expected a 3-D (X,Y,Z) volume")
    if not with_label:
        return image, None
    label = _dataset(case, path, h5, "label")
    if label.shape != image.shape:
        raise _case_error(case, path, f"label shape {label.shape} differs from image shape {image.shape}")
    return image, label


def _read(case: str, path: Path, ds: h5py.Dataset) -> np.ndarray:
    try:
        return ds[()]
    except (OSError, RuntimeError) as err:
        raise _case_error(case, path, f"cannot decode dataset {ds.name!r} (corrupt or truncated file): {err}") \
            from None


def check_case_header(base_dir, case: str, with_label: bool = True) -> dict:
    """Cheap validation of one case without decoding its arrays: folder and file exist, HDF5 opens, datasets
    ``image`` (3-D, numeric) and ``label`` (numeric, same shape) exist.

    Returns dict(case, path, shape (X,Y,Z), image_dtype, label_dtype (None without label)).
    """
    path = _case_file(base_dir, case)
    with _open_h5(case, path) as h5:
        image, label = _checked_datasets(case, path, h5, with_label)
        return dict(case=case, path=path, shape=tuple(image.shape), image_dtype=image.dtype,
                    label_dtype=None if label is None else label.dtype)


def load_case(base_dir, case: str, with_label: bool = True, num_classes: int = 2):
    """Decode and validate one case.

    Returns (image np.float32 (X,Y,Z), label np.uint8 (X,Y,Z) in {0, ..., num_classes - 1} ({0, 1} for LA), or
    None when ``with_label`` is False, in which case the ``label`` dataset is never opened). Raises LADataError
    naming the case and file.
    """
    path = _case_file(base_dir, case)
    with _open_h5(case, path) as h5:
        image_ds, label_ds = _checked_datasets(case, path, h5, with_label)
        image = _read(case, path, image_ds)
        label = None if label_ds is None else _read(case, path, label_ds)
    if not np.isfinite(image).all():
        n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        raise _case_error(case, path, f"image holds {n_nan} NaN and {n_inf} Inf voxels, expected finite values")
    image = image.astype(np.float32, copy=False)
    if label is not None:
        bad = (label < 0) | (label >= num_classes) | (label != np.round(label))
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if values.size > 10 else "")
            allowed = "{0, 1}" if num_classes == 2 else f"{{0, ..., {num_classes - 1}}}"
            raise _case_error(case, path, f"label holds values {{{shown}}}, expected only {allowed}")
        label = label.astype(np.uint8, copy=False)
    return image, label


# ----------------------------------------------------------------------------------------------- splits

def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise LADataError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise LADataError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def split_labeled(n_cases: int, labeled_num: int) -> tuple[list[int], list[int]]:
    """First ``labeled_num`` dataset indices are labeled, all the rest unlabeled (UA-MT's convention, without
    its hard-coded unlabeled range of 80). Requires 1 <= labeled_num <= n_cases."""
    n_cases = _as_int(n_cases, "n_cases")
    labeled_num = _as_int(labeled_num, "labeled_num")
    if n_cases < 1:
        raise LADataError(f"n_cases must be >= 1, got {n_cases}")
    if not 1 <= labeled_num <= n_cases:
        raise LADataError(f"labeled_num must be in [1, {n_cases}] (the number of training cases), got {labeled_num}")
    return list(range(labeled_num)), list(range(labeled_num, n_cases))


# ----------------------------------------------------------------------------------------------- transforms

def _output_size(output_size) -> tuple[int, int, int]:
    size = tuple(int(s) for s in output_size)
    if len(size) != 3 or min(size) < 1:
        raise LADataError(f"output_size must be 3 positive integers (X, Y, Z), got {output_size!r}")
    return size


def _pad_if_small(image: np.ndarray, label: np.ndarray, out: tuple[int, int, int]):
    """Official UA-MT padding: when any axis is <= the patch, every axis gets max((out - size)//2 + 3, 0) zeros on
    both sides (so a large axis may still get 1 or 2 voxels when it exceeds the patch by at most 4)."""
    if any(s <= o for s, o in zip(label.shape, out)):
        pads = [(p, p) for p in (max((o - s) // 2 + 3, 0) for s, o in zip(label.shape, out))]
        image = np.pad(image, pads, mode="constant", constant_values=0)
        label = np.pad(label, pads, mode="constant", constant_values=0)
    return image, label


def _crop(sample: dict, image, label, start, out) -> dict:
    sl = tuple(slice(s, s + o) for s, o in zip(start, out))
    return dict(sample, image=image[sl], label=label[sl])


class RandomRotFlip:
    """UA-MT: rotate by k*90 degrees in the (X, Y) plane (k uniform in 0..3), then flip along axis 0 or 1
    (never z). As officially: odd k swaps the X and Y sizes (it runs before the crop), and since a flip always
    follows, the result is one of the 4 mirror images in (X, Y), each with probability 1/4, never the input."""

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(sample["image"], k), axis=axis).copy()
        label = np.flip(np.rot90(sample["label"], k), axis=axis).copy()
        return dict(sample, image=image, label=label)


class RandomCrop:
    """UA-MT: pad when too small (see ``_pad_if_small``), then a random patch whose start along each axis is
    uniform in [0, size - out) (exclusive, like ``np.random.randint``: the last position is never drawn)."""

    def __init__(self, output_size):
        self.output_size = _output_size(output_size)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, label = _pad_if_small(sample["image"], sample["label"], self.output_size)
        start = [int(rng.integers(0, s - o)) for s, o in zip(image.shape, self.output_size)]
        return _crop(sample, image, label, start, self.output_size)


class CenterCrop:
    """UA-MT: pad when too small, then the patch starting at int(round((size - out) / 2)) along each axis
    (Python's round, i.e. half to even)."""

    def __init__(self, output_size):
        self.output_size = _output_size(output_size)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        image, label = _pad_if_small(sample["image"], sample["label"], self.output_size)
        start = [int(round((s - o) / 2.0)) for s, o in zip(image.shape, self.output_size)]
        return _crop(sample, image, label, start, self.output_size)


class ToTensor:
    """image (X,Y,Z) -> torch.float32 (1,X,Y,Z); label (X,Y,Z) -> torch.int64 (X,Y,Z). Always copies into
    contiguous memory, so flipped or rotated views are safe and tensors never alias the dataset cache."""

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        image = torch.from_numpy(np.array(sample["image"], dtype=np.float32, order="C")[None])
        label = torch.from_numpy(np.array(sample["label"], dtype=np.int64, order="C"))
        return dict(sample, image=image, label=label)


class Compose:
    """Applies transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


# ----------------------------------------------------------------------------------------------- dataset

class LAHeart(Dataset):
    """LA scans of one split.

    Args:
        base_dir: folder of case folders (lists beside it, UA-MT layout).
        split: 'train' / 'test' (-> ``<base_dir>/../<split>.list``); ignored when ``list_file`` is given.
        list_file: explicit list file (e.g. SemiSAM+'s ``splits_semisam_plus/val.txt``).
        num: keep the first ``num`` cases.
        transform: callable(sample dict, rng) -> dict, e.g. ``Compose([RandomRotFlip(), RandomCrop(p), ToTensor()])``.
            Without one (or when it leaves numpy arrays) ``ToTensor`` is applied.
        cache: keep decoded volumes in memory (per process: each DataLoader worker has its own copy).
        withhold_labels: dataset indices of unlabeled scans. Their ``label`` dataset is never read from disk
            (not here, not in the cache); their item label is all zeros and ``labeled`` is False.
        num_classes: label values must lie in 0..num_classes-1 (2 for LA; more for prepared datasets).

    Items (``ds[i]`` or ``ds[(i, aug_seed)]``): dict(image float32 (1,X,Y,Z), label int64 (X,Y,Z), idx int,
    labeled bool, case str). With ``aug_seed`` random transforms draw from ``np.random.default_rng(aug_seed)``;
    without, from a generator seeded by numpy's global RNG (so ``np.random.seed`` governs it, as officially).
    """

    def __init__(self, base_dir=DEFAULT_ROOT, split: str = "train", list_file=None, num=None, transform=None,
                 cache: bool = False, withhold_labels: Iterable[int] = (), num_classes: int = 2):
        self.base_dir = check_data_folder(base_dir)
        self.num_classes = int(num_classes)
        self.list_file = Path(list_file) if list_file is not None else list_path(base_dir, split)
        cases = read_list(self.list_file)
        if num is not None:
            num = _as_int(num, "num")
            if not 1 <= num <= len(cases):
                raise LADataError(f"num must be in [1, {len(cases)}] for list {self.list_file}, got {num}")
            cases = cases[:num]
        self.cases: list[str] = cases
        for case in self.cases:  # fail at construction, not minutes into training
            _case_file(self.base_dir, case)
        self.withhold_labels = frozenset(self._check_index(i, "withhold_labels") for i in withhold_labels)
        self.transform = transform
        self.cache = bool(cache)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    @property
    def image_list(self) -> list[str]:
        """Official attribute name of the case list."""
        return self.cases

    def __len__(self) -> int:
        return len(self.cases)

    def _check_index(self, idx, name: str) -> int:
        idx = _as_int(idx, name)
        if not 0 <= idx < len(self.cases):
            raise LADataError(f"{name}: index {idx} out of range for {len(self.cases)} cases of {self.list_file}")
        return idx

    def is_labeled(self, idx: int) -> bool:
        return idx not in self.withhold_labels

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded (image float32 (X,Y,Z), label uint8 (X,Y,Z) or None for withheld labels), cached if asked."""
        if idx in self._cache:
            return self._cache[idx]
        arrays = load_case(self.base_dir, self.cases[idx], with_label=self.is_labeled(idx),
                           num_classes=self.num_classes)
        if self.cache:
            self._cache[idx] = arrays
        return arrays

    def preload(self, indices: Iterable[int] | None = None) -> None:
        """Decode ``indices`` (default: every case) into the cache now (``cache=True`` only). DataLoader
        workers forked afterwards share these arrays copy-on-write instead of each decoding its own copy."""
        if not self.cache:
            raise LADataError("preload() needs LAHeart(..., cache=True)")
        for idx in range(len(self)) if indices is None else indices:
            self.load(self._check_index(idx, "preload"))

    def verify(self, indices: Iterable[int] | None = None) -> None:
        """Decode and validate ``indices`` (default: every case) now, keeping nothing that ``cache`` would
        not keep: a bad file (truncated, NaN voxels, label values other than 0/1) then stops a run before it
        writes anything, instead of in a DataLoader worker minutes later. Withheld labels stay unread."""
        for idx in range(len(self)) if indices is None else indices:
            self.load(self._check_index(idx, "verify"))

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise LADataError(f"LAHeart key must be idx or (idx, aug_seed), got {key!r}")
            idx, aug_seed = key
            aug_seed = _as_int(aug_seed, "aug_seed")
            if aug_seed < 0:
                raise LADataError(f"aug_seed must be >= 0, got {aug_seed}")
            rng = np.random.default_rng(aug_seed)
        else:
            idx = key
            rng = np.random.default_rng(np.random.randint(0, 2**32, size=2, dtype=np.uint64))
        idx = _as_int(idx, "index")
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} cases")
        idx %= len(self)
        image, label = self.load(idx)
        labeled = label is not None
        if not labeled:
            label = np.zeros(image.shape, dtype=np.uint8)
        sample = {"image": image, "label": label}
        if self.transform is not None:
            sample = self.transform(sample, rng)
        if not isinstance(sample["image"], torch.Tensor):
            sample = ToTensor()(sample)
        sample.update(idx=idx, labeled=labeled, case=self.cases[idx])
        return sample


# ----------------------------------------------------------------------------------------------- sampler

_PRIMARY, _SECONDARY, _AUG = 0, 1, 2  # SeedSequence tags keeping the three random streams independent


def _index_array(indices, name: str, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(list(indices))
    if arr.size == 0:
        if allow_empty:
            return np.zeros(0, dtype=np.int64)
        raise LADataError(f"{name} is empty: the sampler needs at least one index")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise LADataError(f"{name} must be a flat sequence of integer dataset indices, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise LADataError(f"{name} holds negative index {int(arr.min())}")
    if np.unique(arr).size != arr.size:
        raise LADataError(f"{name} holds duplicate indices")
    return arr.astype(np.int64)


class TwoStreamBatchSampler(Sampler):
    """Infinite, deterministic, resumable batches of labeled + unlabeled indices.

    Each batch is a list of ``batch_size`` tuples (idx, aug_seed): ``batch_size - secondary_batch_size`` from
    ``primary_indices`` (labeled) then ``secondary_batch_size`` from ``secondary_indices`` (unlabeled). Each
    stream is an endless chain of permutations of its indices, permutation e drawn from
    SeedSequence([seed, rank, stream, e]); batches run across permutation boundaries (as the official eternal
    unlabeled stream does), so every labeled count >= 1 works. aug_seed of position j in batch t comes from
    SeedSequence([seed, rank, 2, t, j]). Hence ``batch_at(t)`` is a pure function of (seed, rank, t): ranks
    of a DDP job draw different batches, and resuming at t reproduces the run exactly.

    ``state_dict()['next_batch']`` counts the batches this sampler has yielded. A DataLoader prefetches ahead of
    training, so when saving a checkpoint store the training iteration as ``next_batch``.
    """

    def __init__(self, primary_indices, secondary_indices, batch_size: int, secondary_batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.batch_size = _as_int(batch_size, "batch_size")
        self.secondary_batch_size = _as_int(secondary_batch_size, "secondary_batch_size")
        if not 0 <= self.secondary_batch_size < self.batch_size:
            raise LADataError(f"need 0 <= secondary_batch_size < batch_size, got "
                              f"secondary_batch_size={self.secondary_batch_size}, batch_size={self.batch_size}")
        self.primary = _index_array(primary_indices, "primary_indices (labeled)")
        # secondary_batch_size 0 (supervised only, e.g. every case labeled): the unlabeled stream is unused
        self.secondary = _index_array(secondary_indices, "secondary_indices (unlabeled)",
                                      allow_empty=self.secondary_batch_size == 0)
        overlap = np.intersect1d(self.primary, self.secondary)
        if overlap.size:
            raise LADataError(f"labeled and unlabeled indices overlap: {overlap[:10].tolist()}")
        self.primary_batch_size = self.batch_size - self.secondary_batch_size
        self.seed = _as_int(seed, "seed")
        self.rank = _as_int(rank, "rank")
        self.world_size = _as_int(world_size, "world_size")
        if self.seed < 0:
            raise LADataError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.rank < self.world_size:
            raise LADataError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self._next_batch = 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Batches per pass over the labeled indices (information only: iteration never ends)."""
        return max(1, len(self.primary) // self.primary_batch_size)

    def _permutation(self, stream: int, epoch: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            indices = self.primary if stream == _PRIMARY else self.secondary
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, stream, epoch]))
            self._perms[key] = rng.permutation(indices)
        return self._perms[key]

    def _take(self, stream: int, start: int, count: int) -> list[int]:
        n = len(self.primary) if stream == _PRIMARY else len(self.secondary)
        return [int(self._permutation(stream, p // n)[p % n]) for p in range(start, start + count)]

    def _aug_seed(self, t: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.rank, _AUG, t, position]).generate_state(1, np.uint64)[0])

    def batch_at(self, t: int) -> list[tuple[int, int]]:
        """Batch number ``t`` (0-based): list of (dataset index, aug_seed)."""
        t = _as_int(t, "t")
        if t < 0:
            raise LADataError(f"batch number must be >= 0, got {t}")
        idxs = (self._take(_PRIMARY, t * self.primary_batch_size, self.primary_batch_size)
                + self._take(_SECONDARY, t * self.secondary_batch_size, self.secondary_batch_size))
        return [(i, self._aug_seed(t, j)) for j, i in enumerate(idxs)]

    def __iter__(self):
        while True:
            t = self._next_batch
            self._next_batch = t + 1
            yield self.batch_at(t)

    def _fingerprint(self) -> int:
        return zlib.crc32(self.primary.tobytes() + b"|" + self.secondary.tobytes())

    def state_dict(self) -> dict:
        return {"next_batch": self._next_batch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "secondary_batch_size": self.secondary_batch_size, "indices_crc32": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['next_batch']``. Other keys, when present, must match this sampler (a resumed run
        with another seed, rank, batch layout or index split would silently differ)."""
        if "next_batch" not in state:
            raise LADataError(f"sampler state lacks 'next_batch' (got keys {sorted(state)})")
        mine = self.state_dict()
        for key in ("seed", "rank", "batch_size", "secondary_batch_size", "indices_crc32"):
            if key in state and state[key] != mine[key]:
                raise LADataError(f"sampler state mismatch for {key!r}: saved {state[key]!r}, this sampler "
                                  f"{mine[key]!r}")
        t = _as_int(state["next_batch"], "next_batch")
        if t < 0:
            raise LADataError(f"next_batch must be >= 0, got {t}")
        self._next_batch = t
