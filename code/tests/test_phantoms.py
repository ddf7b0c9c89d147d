"""Synthetic LA-like phantoms: determinism, LA layout, plausibility (label fraction, not a threshold task)."""
import time

import h5py
import numpy as np
import pytest
from scipy import ndimage

import make_phantoms
from dataloaders.la_heart import LAHeart, load_case, read_list
from dataloaders.layout import TRAINING_FOLDER
from dataloaders.phantoms import (DEFAULT_SIZE, INTENSITY_OFFSET, INTENSITY_SCALE, PhantomError, case_name,
                                 phantom_case, write_phantom_dataset)
from utils.errors import run_entry

SMALL = (64, 56, 40)


def best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Best Dice of ``image > t`` against ``label`` over every threshold t (exact: predicting the k brightest
    voxels gives Dice 2 TP_k / (k + |label|); maximise over k)."""
    order = np.argsort(image.ravel(), kind="stable")[::-1]
    tp = np.cumsum(label.ravel()[order].astype(np.int64))
    k = np.arange(1, tp.size + 1)
    return float(np.max(2.0 * tp / (k + tp[-1])))


@pytest.fixture(scope="module")
def full_size_cases():
    return [phantom_case(seed, 0) for seed in (0, 1, 2)]


def test_same_seed_gives_identical_bytes_and_different_seeds_differ():
    a, b = phantom_case(7, 3, SMALL), phantom_case(7, 3, SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    for other in (phantom_case(8, 3, SMALL), phantom_case(7, 4, SMALL)):
        assert not np.array_equal(other.image, a.image)
        assert not np.array_equal(other.label, a.label)


def test_dataset_is_deterministic_and_case_does_not_depend_on_counts(tmp_path):
    write_phantom_dataset(tmp_path / "a", n_train=2, n_test=1, size=SMALL, seed=5)
    write_phantom_dataset(tmp_path / "b", n_train=1, n_test=2, size=SMALL, seed=5)
    for case in ("PHANTOM_000", "PHANTOM_001", "PHANTOM_002"):
        img_a, lab_a = load_case(tmp_path / "a" / TRAINING_FOLDER, case)
        img_b, lab_b = load_case(tmp_path / "b" / TRAINING_FOLDER, case)
        assert img_a.tobytes() == img_b.tobytes() and lab_a.tobytes() == lab_b.tobytes()
    direct = phantom_case(5, 2, SMALL)
    assert np.array_equal(img_a, direct.image) and np.array_equal(lab_a, direct.label)


def test_layout_loads_with_the_la_data_layer(tmp_path):
    splits = write_phantom_dataset(tmp_path, n_train=3, n_test=2, size=SMALL, seed=0)
    assert splits == {"train": [case_name(i) for i in range(3)], "test": [case_name(i) for i in (3, 4)]}
    assert read_list(tmp_path / "train.list") == ["PHANTOM_000", "PHANTOM_001", "PHANTOM_002"]
    assert read_list(tmp_path / "test.list") == ["PHANTOM_003", "PHANTOM_004"]
    base = tmp_path / TRAINING_FOLDER
    with h5py.File(base / "PHANTOM_000" / "mri_norm2.h5", "r") as h5:
        assert sorted(h5.keys()) == ["image", "label"]
        assert h5["image"].dtype == np.float32 and h5["label"].dtype == np.uint8
        assert h5["image"].shape == SMALL and h5["image"].compression == "gzip"
        assert h5["label"].compression == "gzip"
    image, label = load_case(base, "PHANTOM_004")
    assert image.shape == SMALL and set(np.unique(label)) == {0, 1}
    # z-scored over the volume, then the scan's own scale and offset
    assert INTENSITY_SCALE[0] - 1e-3 < float(image.std()) < INTENSITY_SCALE[1] + 1e-3
    assert INTENSITY_OFFSET[0] - 1e-3 < float(image.mean()) < INTENSITY_OFFSET[1] + 1e-3
    for split, n in (("train", 3), ("test", 2)):
        ds = LAHeart(base_dir=base, split=split)
        assert len(ds) == n
        item = ds[(n - 1, 0)]
        assert tuple(item["image"].shape) == (1,) + SMALL and tuple(item["label"].shape) == SMALL
        assert item["label"].sum() > 0 and item["case"] == splits[split][-1]
    assert not list(tmp_path.rglob("*.tmp"))


def test_label_fraction_is_plausible_and_label_is_one_component(full_size_cases):
    for case in full_size_cases:
        assert case.image.shape == DEFAULT_SIZE and case.image.dtype == np.float32
        assert case.label.dtype == np.uint8
        fraction = case.label.mean()
        assert 0.02 < fraction < 0.12, fraction  # real LA crops: 3.5-19 %, median 9 %
        _, n = ndimage.label(case.label, structure=np.ones((3, 3, 3)))
        assert n == 1


def test_label_is_not_a_threshold_of_the_image(full_size_cases):
    for case in full_size_cases:
        assert best_threshold_dice(case.image, case.label) < 0.8
        # ... although the atrium is clearly brighter than average: the difficulty is the neighbours
        assert np.median(case.image[case.label > 0]) > np.quantile(case.image, 0.9)


def test_neighbours_are_as_bright_as_the_atrium_and_unlabelled(full_size_cases):
    for case in full_size_cases:
        lab = case.label.astype(bool)
        assert case.neighbours.sum() > 0.5 * lab.sum()
        assert not (case.neighbours.astype(bool) & lab).any()
        level = np.median(case.image[lab])
        # a threshold that keeps 3/4 of the atrium keeps most of the neighbours too (the bias field makes them
        # brighter or darker than the atrium, case by case)
        assert np.mean(case.image[case.neighbours > 0] > np.quantile(case.image[lab], 0.25)) > 0.5
        bright_outside = np.count_nonzero((case.image > level) & ~lab)
        assert bright_outside > 0.25 * np.count_nonzero(case.image[lab] > level)


def test_full_size_case_is_fast():
    phantom_case(0, 9, SMALL)  # warm-up (imports, caches)
    start = time.process_time()
    phantom_case(0, 10)
    assert time.process_time() - start < 3.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=(20, 64, 64)), "size must be 3 integers >= 24"),
    (dict(size=(64, 64)), "size must be 3 integers"),
    (dict(n_test=0), "n_test must be an integer >= 1"),
    (dict(n_train=1.5), "n_train must be an integer >= 1"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    args = dict(out=tmp_path, n_train=1, n_test=1, size=SMALL, seed=0)
    args.update(kwargs)
    with pytest.raises(PhantomError, match=match):
        write_phantom_dataset(**args)


def test_output_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PhantomError, match="is not a folder"):
        write_phantom_dataset(target, 1, 1, SMALL)


def test_cli_writes_the_dataset_and_reports_bad_sizes(tmp_path, capsys):
    out = tmp_path / "ph"
    assert make_phantoms.main(["--out", str(out), "--n_train", "1", "--n_test", "1", "--size", "40", "32", "24",
                               "--seed", "3"]) == 0
    image, label = load_case(out / TRAINING_FOLDER, "PHANTOM_001")
    assert image.shape == (40, 32, 24)
    assert np.array_equal(image, phantom_case(3, 1, (40, 32, 24)).image)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:   # the script's entry point: one line on stderr, status 2
        run_entry(lambda: make_phantoms.main(["--out", str(out), "--size", "8", "8", "8"]), prog="make_phantoms.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("make_phantoms.py: error: phantom size must be 3 integers >= 24")


def test_scans_differ_in_intensity_scale_as_the_real_data_does():
    # the atrium's mean intensity over the LA scans spans 0.32-4.20 (10th-90th percentile 0.98-3.12); two
    # labeled scans of one scale must not cover the population (version 3)
    means = []
    for i in range(12):
        case = phantom_case(0, i, SMALL)
        means.append(float(case.image[case.label > 0].mean()))
    assert max(means) / min(means) > 2.5 and max(means) - min(means) > 1.5, means
