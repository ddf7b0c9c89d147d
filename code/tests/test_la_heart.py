"""LA data layer: real-data checks (LA_DATA_ROOT), error handling on broken files, UA-MT transform semantics,
label withholding of unlabeled scans, and the deterministic two-stream sampler."""
import re

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.la_heart import (
    CenterCrop, Compose, LADataError, LAHeart, RandomCrop, RandomRotFlip, ToTensor, TwoStreamBatchSampler,
    check_case_header, list_path, load_case, read_list, split_labeled,
)

PATCH = (112, 112, 80)


# ----------------------------------------------------------------------------------------------- helpers

def write_case(base, case, image=None, label=None, shape=(12, 10, 8), seed=0):
    """Write <base>/<case>/mri_norm2.h5; image/label default to a valid random case, False omits a dataset."""
    rng = np.random.default_rng(seed)
    if image is None:
        image = rng.standard_normal(shape).astype(np.float32)
    if label is None:
        label = (rng.random(shape) > 0.7).astype(np.uint8)
    (base / case).mkdir(parents=True, exist_ok=True)
    path = base / case / "mri_norm2.h5"
    with h5py.File(path, "w") as f:
        if image is not False:
            f.create_dataset("image", data=image, compression="gzip")
        if label is not False:
            f.create_dataset("label", data=label, compression="gzip")
    return path


def make_set(tmp_path, cases, split="train"):
    base = tmp_path / "2018LA_Seg_Training Set"
    base.mkdir(exist_ok=True)
    for i, case in enumerate(cases):
        write_case(base, case, seed=i)
    (tmp_path / f"{split}.list").write_text("".join(c + "\n" for c in cases))
    return base


def train_transform():
    return Compose([RandomRotFlip(), RandomCrop(PATCH), ToTensor()])


# ----------------------------------------------------------------------------------------------- real data

def test_all_100_headers_valid_without_decoding(la_root, la_data_dir):
    train, test = read_list(la_root / "train.list"), read_list(la_root / "test.list")
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    assert sorted(train + test) == sorted(p.name for p in la_data_dir.iterdir() if p.is_dir())
    for case in train + test:
        info = check_case_header(la_data_dir, case)
        x, y, z = info["shape"]
        assert info["image_dtype"] == np.float32 and info["label_dtype"] == np.uint8, case
        assert 100 <= x <= 300 and 100 <= y <= 300 and 60 <= z <= 120, (case, info["shape"])  # cropped LA scans


def test_load_one_real_case(la_root, la_data_dir):
    case = read_list(la_root / "train.list")[0]
    image, label = load_case(la_data_dir, case)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.ndim == 3 and image.shape == label.shape == check_case_header(la_data_dir, case)["shape"]
    assert set(np.unique(label).tolist()) == {0, 1}
    assert 0.001 < label.mean() < 0.2  # the atrium is a small part of the cropped volume
    assert np.isfinite(image).all() and image.std() > 0.5
    image2, none = load_case(la_data_dir, case, with_label=False)
    assert none is None and np.array_equal(image, image2)


def test_training_batch_two_streams(la_data_dir):
    ds0 = LAHeart(la_data_dir, split="train")
    labeled, unlabeled = split_labeled(len(ds0), 16)
    ds = LAHeart(la_data_dir, split="train", transform=train_transform(), withhold_labels=unlabeled)
    sampler = TwoStreamBatchSampler(labeled, unlabeled, batch_size=4, secondary_batch_size=2, seed=3)
    batch = next(iter(DataLoader(ds, batch_sampler=sampler, num_workers=0)))
    assert batch["image"].shape == (4, 1, *PATCH) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, *PATCH) and batch["label"].dtype == torch.int64
    idx = batch["idx"].tolist()
    assert all(i < 16 for i in idx[:2]) and all(16 <= i < 80 for i in idx[2:])
    assert batch["labeled"].tolist() == [True, True, False, False]
    assert batch["case"] == [ds.cases[i] for i in idx]
    assert batch["label"][2:].abs().sum() == 0
    assert set(torch.unique(batch["label"][:2]).tolist()) <= {0, 1}
    assert sampler.state_dict()["next_batch"] == 1


def _first_batches(data_dir, seed, num_workers, n=2):
    ds = LAHeart(data_dir, split="train", num=20, transform=train_transform(), withhold_labels=range(4, 20))
    sampler = TwoStreamBatchSampler(range(4), range(4, 20), batch_size=4, secondary_batch_size=2, seed=seed)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out


def test_batches_deterministic_across_workers(la_data_dir):
    a = _first_batches(la_data_dir, seed=11, num_workers=0)
    b = _first_batches(la_data_dir, seed=11, num_workers=2)
    for x, y in zip(a, b):
        assert x["idx"].tolist() == y["idx"].tolist()
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    c = _first_batches(la_data_dir, seed=12, num_workers=0, n=1)
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_item_with_aug_seed_is_reproducible(la_data_dir):
    ds = LAHeart(la_data_dir, split="test", num=2, transform=train_transform(), cache=True)
    a, b, c = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    assert a["labeled"] is True and a["case"] == ds.cases[1] and a["idx"] == 1
    a["image"].zero_()  # tensors must not alias the cache
    assert torch.equal(ds[(1, 123)]["image"], b["image"])


def test_semisam_plus_val_list_and_splits(la_root, la_data_dir):
    val_file = la_root / "splits_semisam_plus" / "val.txt"
    ds = LAHeart(la_data_dir, list_file=val_file, transform=Compose([CenterCrop(PATCH), ToTensor()]))
    assert ds.cases == read_list(val_file) and len(ds) == 5
    item = ds[0]
    assert item["image"].shape == (1, *PATCH) and item["labeled"] is True
    assert len(LAHeart(la_data_dir, split="test")) == 20
    assert LAHeart(la_data_dir, split="train", num=16).cases == read_list(la_root / "train.list")[:16]


# ----------------------------------------------------------------------------------------------- withholding

def test_withheld_labels_are_never_read(tmp_path, monkeypatch):
    base = make_set(tmp_path, ["A", "B", "C"])
    # Case C's label is garbage: wrong shape and value 7. Withheld, it must not matter.
    write_case(base, "C", image=np.ones((12, 10, 8), np.float32), label=np.full((3, 3), 7, np.uint8))
    opened = []
    real_getitem = h5py.Group.__getitem__

    def spy(self, name):
        opened.append((self.file.filename, name))
        return real_getitem(self, name)

    monkeypatch.setattr(h5py.Group, "__getitem__", spy)
    for cache in (False, True):
        ds = LAHeart(base, split="train", withhold_labels=[2], cache=cache)
        for _ in range(2):  # second pass comes from the cache when enabled
            item = ds[(2, 5)]
            assert item["labeled"] is False and item["label"].shape == (12, 10, 8)
            assert item["label"].dtype == torch.int64 and item["label"].abs().sum() == 0
            assert torch.equal(item["image"], torch.ones(1, 12, 10, 8))
            assert ds[0]["labeled"] is True and ds[0]["label"].sum() > 0
    # preloading (the training default) decodes the cases once, still without the withheld label
    ds = LAHeart(base, split="train", withhold_labels=[2], cache=True)
    ds.preload([0, 2])
    assert sorted(ds._cache) == [0, 2] and ds._cache[2][1] is None and ds._cache[0][1] is not None
    with pytest.raises(LADataError, match="preload: index 3 out of range"):
        ds.preload([3])
    with pytest.raises(LADataError, match="cache=True"):
        LAHeart(base, split="train").preload()
    image, label = load_case(base, "C", with_label=False)
    assert label is None and image.shape == (12, 10, 8)
    check_case_header(base, "C", with_label=False)
    c_file = str(base / "C" / "mri_norm2.h5")
    assert (c_file, "image") in opened and (c_file, "label") not in opened
    with pytest.raises(LADataError, match=r"'C'.*label shape \(3, 3\) differs from image shape \(12, 10, 8\)"):
        LAHeart(base, split="train")[2]


def test_withhold_labels_index_checked(tmp_path):
    base = make_set(tmp_path, ["A", "B"])
    with pytest.raises(LADataError, match=r"withhold_labels: index 2 out of range for 2 cases"):
        LAHeart(base, withhold_labels=[2])


# ----------------------------------------------------------------------------------------------- errors

def test_list_errors(tmp_path):
    base = make_set(tmp_path, ["A", "B"])
    with pytest.raises(LADataError, match=r"list file not found: .*test\.list"):
        LAHeart(base, split="test")
    (tmp_path / "empty.list").write_text("\n  \n")
    with pytest.raises(LADataError, match=r"empty\.list is empty"):
        LAHeart(base, list_file=tmp_path / "empty.list")
    (tmp_path / "dup.list").write_text("A\nB\r\nA\n")
    with pytest.raises(LADataError, match=r"dup\.list: case 'A' appears twice \(entries 1 and 3\)"):
        read_list(tmp_path / "dup.list")
    (tmp_path / "crlf.list").write_text("A\r\nB")  # Windows endings, no final newline
    assert LAHeart(base, list_file=tmp_path / "crlf.list").cases == ["A", "B"]
    with pytest.raises(LADataError, match=r"num must be in \[1, 2\]"):
        LAHeart(base, num=3)
    assert list_path(base, "train") == base / ".." / "train.list"
    assert list_path(base, str(tmp_path / "x.txt")) == tmp_path / "x.txt"


def test_missing_folder_and_file(tmp_path):
    base = make_set(tmp_path, ["A", "B"])
    (tmp_path / "more.list").write_text("A\nGHOST\n")
    with pytest.raises(LADataError, match=r"'GHOST'.*case folder not found"):
        LAHeart(base, list_file=tmp_path / "more.list")
    (base / "B" / "mri_norm2.h5").unlink()
    with pytest.raises(LADataError, match=r"'B'.*mri_norm2\.h5 not found"):
        LAHeart(base)
    with pytest.raises(LADataError, match=r"'B'.*mri_norm2\.h5 not found"):
        load_case(base, "B")


def _broken(kind, path):
    shape = (6, 5, 4)
    if kind == "not_hdf5":
        path.write_bytes(b"this is not an HDF5 file\n" * 40)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "no_image":
        write_case(path.parent.parent, path.parent.name, image=False, shape=shape)
    elif kind == "no_label":
        write_case(path.parent.parent, path.parent.name, label=False, shape=shape)
    elif kind == "shape":
        write_case(path.parent.parent, path.parent.name, image=np.zeros(shape, np.float32),
                   label=np.zeros((6, 5, 3), np.uint8))
    elif kind == "not_3d":
        write_case(path.parent.parent, path.parent.name, image=np.zeros((6, 5), np.float32),
                   label=np.zeros((6, 5), np.uint8))
    elif kind == "label_values":
        label = np.zeros(shape, np.uint8)
        label[0, 0, :3] = [1, 2, 255]
        write_case(path.parent.parent, path.parent.name, image=np.zeros(shape, np.float32), label=label)
    elif kind == "nonfinite":
        image = np.zeros(shape, np.float32)
        image[1, 1, 1], image[2, 2, 2] = np.nan, -np.inf
        write_case(path.parent.parent, path.parent.name, image=image, label=np.zeros(shape, np.uint8))


BROKEN = {
    "not_hdf5": r"cannot open as HDF5 \(not an HDF5 file, or truncated\)",
    "truncated": r"cannot open as HDF5 .*truncated",
    "no_image": r"missing dataset 'image' \(found keys \['label'\]",
    "no_label": r"missing dataset 'label' \(found keys \['image'\]",
    "shape": r"label shape \(6, 5, 3\) differs from image shape \(6, 5, 4\)",
    "not_3d": r"image has shape \(6, 5\), expected a 3-D",
    "label_values": r"label holds values \{2, 255\}, expected only \{0, 1\}",
    "nonfinite": r"image holds 1 NaN and 1 Inf voxels",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_h5_errors(tmp_path, kind):
    base = make_set(tmp_path, ["A", "BAD"])
    path = base / "BAD" / "mri_norm2.h5"
    _broken(kind, path)
    ds = LAHeart(base)
    assert ds[0]["labeled"] is True
    pattern = r"LA case 'BAD' \(.*BAD[/\\]mri_norm2\.h5\): " + BROKEN[kind]
    with pytest.raises(LADataError, match=pattern):
        ds[1]
    with pytest.raises(LADataError, match=pattern):
        load_case(base, "BAD")
    if kind not in ("label_values", "nonfinite"):  # value errors need decoding; the header check does not decode
        with pytest.raises(LADataError, match=pattern):
            check_case_header(base, "BAD")
    else:
        check_case_header(base, "BAD")


def test_corrupt_chunk_reported(tmp_path):
    base = make_set(tmp_path, ["A"])
    path = write_case(base, "A", shape=(40, 40, 40))
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = b"\x00" * 2000
    path.write_bytes(bytes(data))
    check_case_header(base, "A")  # metadata is intact
    with pytest.raises(LADataError, match=r"LA case 'A' .*cannot decode dataset '/image'"):
        load_case(base, "A")


# ----------------------------------------------------------------------------------------------- transforms

def _coded(shape):
    """Volume whose every voxel value is unique and nonzero, so crops can be located exactly."""
    return (np.arange(np.prod(shape), dtype=np.float32) + 1).reshape(shape)


def test_center_crop_official_padding_and_rounding():
    # No padding (all axes larger than the patch); starts round(1.5)=2, round(1.0)=1, round(0.5)=0 (half to even).
    img = _coded((11, 10, 9))
    out = CenterCrop((8, 8, 8))({"image": img, "label": img.astype(np.int64)})
    assert np.array_equal(out["image"], img[2:10, 1:9, 0:8]) and np.array_equal(out["label"], img[2:10, 1:9, 0:8])
    # x <= patch triggers padding of every axis by max((8 - s)//2 + 3, 0): x 4, y 1 (!), z 2 -> (14, 14, 13);
    # starts 3, 3 and round(2.5) = 2.
    img = _coded((6, 12, 9))
    out = CenterCrop((8, 8, 8))({"image": img, "label": img})
    padded = np.pad(img, ((4, 4), (1, 1), (2, 2)))
    assert np.array_equal(out["image"], padded[3:11, 3:11, 2:10])
    # An axis equal to the patch also pads (official `<=`): x 3 -> 14, y and z untouched; x window = all of x.
    img = _coded((8, 20, 20))
    out = CenterCrop((8, 8, 8))({"image": img, "label": img})
    assert np.array_equal(out["image"], img[:, 6:14, 6:14])


def test_random_crop_padding_and_start_range():
    img = _coded((10, 12, 6))
    padded = np.pad(img, ((2, 2), (5, 5), (4, 4)))  # y, z <= patch: pads (8-10)//2+3=2, (16-12)//2+3=5, 4
    assert padded.shape == (14, 22, 14)
    starts = set()
    for s in range(300):
        out = RandomCrop((8, 16, 8))({"image": img, "label": img.astype(np.uint8)}, np.random.default_rng(s))
        assert out["image"].shape == (8, 16, 8) and out["label"].shape == (8, 16, 8)
        found = [(a, b, c) for a in range(7) for b in range(7) for c in range(7)
                 if np.array_equal(padded[a:a + 8, b:b + 16, c:c + 8], out["image"])]
        assert len(found) == 1
        assert np.array_equal(out["label"], padded[tuple(slice(p, p + o) for p, o in
                                                         zip(found[0], (8, 16, 8)))].astype(np.uint8))
        starts.add(found[0])
    # starts uniform in [0, size - out) exclusive, like np.random.randint: 6 is never drawn
    assert {a for a, _, _ in starts} == set(range(6)) and {b for _, b, _ in starts} == set(range(6))
    assert {c for _, _, c in starts} == set(range(6))
    # An axis equal to the patch is padded too (official `<=`): x starts cover [0, 6) of the padded 14.
    img = _coded((8, 20, 20))
    padded = np.pad(img, ((3, 3), (0, 0), (0, 0)))
    xs = set()
    for s in range(60):
        out = RandomCrop((8, 8, 8))({"image": img, "label": img}, np.random.default_rng(s))["image"]
        found = [a for a in range(7) for b in range(13) for c in range(13)
                 if np.array_equal(padded[a:a + 8, b:b + 8, c:c + 8], out)]
        assert len(found) == 1
        xs.add(found[0])
    assert xs == set(range(6))


def test_random_rot_flip_official_candidates_and_alignment():
    rng0 = np.random.default_rng(0)
    img = rng0.standard_normal((7, 5, 3)).astype(np.float32)
    label = (img > 0.3).astype(np.uint8)
    # rot90 in (X, Y) by k, then a flip of axis 0 or 1: (k, 0) and (k + 2, 1) coincide, so the official
    # transform yields the 4 mirror images of the (X, Y) square group and never the unflipped volume.
    candidates = [np.flip(np.rot90(img, k), axis=ax) for k in range(4) for ax in range(2)]
    distinct = []
    for c in candidates:
        if not any(c.shape == d.shape and np.array_equal(c, d) for d in distinct):
            distinct.append(c)
    assert len(distinct) == 4
    seen = set()
    for s in range(200):
        out = RandomRotFlip()({"image": img, "label": label, "extra": "kept"}, np.random.default_rng(s))
        match = [j for j, d in enumerate(distinct) if d.shape == out["image"].shape
                 and np.array_equal(d, out["image"])]
        assert len(match) == 1  # no flip along z, no transpose other than rot90 in (X, Y)
        seen.add(match[0])
        assert np.array_equal(out["label"], (out["image"] > 0.3).astype(np.uint8))
        assert out["extra"] == "kept" and all(st > 0 for st in out["image"].strides)
        torch.from_numpy(out["image"])  # no negative strides
    assert seen == {0, 1, 2, 3}


def test_to_tensor_and_compose():
    img = np.flip(np.arange(24, dtype=np.float64).reshape(2, 3, 4), axis=0)
    label = np.flip(np.eye(4, dtype=np.uint8)[:2, :3, None].repeat(4, axis=2), axis=1)
    out = Compose([ToTensor()])({"image": img, "label": label}, np.random.default_rng(0))
    assert out["image"].shape == (1, 2, 3, 4) and out["image"].dtype == torch.float32
    assert out["label"].shape == (2, 3, 4) and out["label"].dtype == torch.int64
    assert torch.equal(out["image"][0], torch.from_numpy(img.copy()).float())
    assert torch.equal(out["label"], torch.from_numpy(label.copy()).long())
    with pytest.raises(LADataError, match="output_size must be 3 positive integers"):
        RandomCrop((112, 112))


# ----------------------------------------------------------------------------------------------- splits

def test_split_labeled_bounds():
    assert split_labeled(80, 1) == ([0], list(range(1, 80)))
    assert split_labeled(80, 16) == (list(range(16)), list(range(16, 80)))
    assert split_labeled(80, 80) == (list(range(80)), [])
    assert split_labeled(75, 8)[1] == list(range(8, 75))  # unlabeled = rest of the list, not a hard-coded 80
    for bad in (0, 81, -3):
        with pytest.raises(LADataError, match=rf"labeled_num must be in \[1, 80\].*got {bad}"):
            split_labeled(80, bad)
    for bad in ("16", 16.0, True):
        with pytest.raises(LADataError, match="labeled_num must be an integer"):
            split_labeled(80, bad)


# ----------------------------------------------------------------------------------------------- sampler

def test_sampler_layout_and_pure_batch_at():
    s = TwoStreamBatchSampler(range(5), range(5, 30), batch_size=4, secondary_batch_size=2, seed=1)
    it = iter(s)
    batches = [next(it) for _ in range(50)]
    assert batches == [s.batch_at(t) for t in range(50)]
    for b in batches:
        assert len(b) == 4 and all(i < 5 for i, _ in b[:2]) and all(5 <= i < 30 for i, _ in b[2:])
    # each stream is a chain of permutations: 50 batches x 2 = 100 labeled draws = 20 full passes over 5
    labeled = [i for b in batches for i, _ in b[:2]]
    assert all(sorted(labeled[k:k + 5]) == list(range(5)) for k in range(0, 100, 5))
    unlabeled = [i for b in batches for i, _ in b[2:]]
    assert all(sorted(unlabeled[k:k + 25]) == list(range(5, 30)) for k in range(0, 100, 25))
    assert labeled[:5] != labeled[5:10]  # reshuffled each pass
    seeds = [a for b in batches for _, a in b]
    assert len(set(seeds)) == len(seeds)
    assert len(s) == 2


def test_sampler_resume_and_ranks():
    a = TwoStreamBatchSampler([0, 1], range(2, 12), batch_size=3, secondary_batch_size=1, seed=5)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    assert state["next_batch"] == 7
    b = TwoStreamBatchSampler([0, 1], range(2, 12), batch_size=3, secondary_batch_size=1, seed=5)
    b.load_state_dict(state)
    assert next(iter(b)) == next(it) == a.batch_at(7)
    b.load_state_dict({"next_batch": 3})
    assert next(iter(b)) == a.batch_at(3)
    other_seed = TwoStreamBatchSampler([0, 1], range(2, 12), batch_size=3, secondary_batch_size=1, seed=6)
    with pytest.raises(LADataError, match=r"mismatch for 'seed': saved 5, this sampler 6"):
        other_seed.load_state_dict(state)
    r0 = TwoStreamBatchSampler(range(8), range(8, 40), 4, 2, seed=5, rank=0, world_size=2)
    r1 = TwoStreamBatchSampler(range(8), range(8, 40), 4, 2, seed=5, rank=1, world_size=2)
    def idx(s):
        return [[i for i, _ in s.batch_at(t)] for t in range(5)]

    assert idx(r0) != idx(r1)  # ranks draw different samples, not only different augmentations
    assert [r1.batch_at(t) for t in range(5)] == [
        TwoStreamBatchSampler(range(8), range(8, 40), 4, 2, seed=5, rank=1, world_size=2).batch_at(t)
        for t in range(5)]


def test_sampler_single_labeled_case_and_errors():
    s = TwoStreamBatchSampler([3], [0, 1, 2], batch_size=4, secondary_batch_size=2)
    assert [i for i, _ in s.batch_at(0)[:2]] == [3, 3] and len(s) == 1
    cases = [
        (([], [1], 2, 1), r"primary_indices \(labeled\) is empty"),
        (([0], [], 2, 1), r"secondary_indices \(unlabeled\) is empty"),
        (([0, 1], [1, 2], 2, 1), r"labeled and unlabeled indices overlap: \[1\]"),
        (([0], [1], 2, 2), r"need 0 <= secondary_batch_size < batch_size.*secondary_batch_size=2, batch_size=2"),
        (([0], [1], 2, -1), r"need 0 <= secondary_batch_size < batch_size"),
        (([0, 0], [1], 2, 1), r"primary_indices \(labeled\) holds duplicate indices"),
    ]
    for args, msg in cases:
        with pytest.raises(LADataError, match=msg):
            TwoStreamBatchSampler(*args)
    with pytest.raises(LADataError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TwoStreamBatchSampler([0], [1], 2, 1, rank=2, world_size=2)
    # every case labeled (supervised only): no unlabeled stream, labeled batches only
    everything = TwoStreamBatchSampler(range(80), [], batch_size=4, secondary_batch_size=0, seed=2)
    batches = [[i for i, _ in everything.batch_at(t)] for t in range(20)]
    assert all(len(b) == 4 for b in batches) and sorted(sum(batches, [])) == list(range(80))
    with pytest.raises(LADataError, match=re.escape("sampler state lacks 'next_batch'")):
        s.load_state_dict({})
