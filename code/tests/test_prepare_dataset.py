"""prepare_dataset.py: nnU-Net / Decathlon NIfTI datasets -> training-ready cases, and predictions back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

import prepare_dataset
from dataloaders.la_heart import load_case, read_list
from dataloaders.prepare import PrepareError, prepare_dataset as prepare, to_source_grid, to_xyz

CODE_DIR = Path(__file__).resolve().parents[1]


def _image(arr_xyz: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    return img


def _write_dataset(root: Path, cases: dict, labels: dict, orientation: str | None = None, ending=".nii.gz",
                   spacing=(1.0, 1.0, 1.0)) -> Path:
    """cases: name -> (image (X, Y, Z), label (X, Y, Z) or None)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": labels,
                                                   "file_ending": ending, "numTraining": len(cases)}))
    for name, (image, label) in cases.items():
        img = _image(image.astype(np.float32), spacing, origin=(-3.0, 7.5, 2.0))
        lab = None if label is None else _image(label.astype(np.uint8), spacing, origin=(-3.0, 7.5, 2.0))
        if orientation:
            img = sitk.DICOMOrient(img, orientation)
            lab = None if lab is None else sitk.DICOMOrient(lab, orientation)
        sitk.WriteImage(img, str(root / "imagesTr" / f"{name}_0000{ending}"))
        if lab is not None:
            sitk.WriteImage(lab, str(root / "labelsTr" / f"{name}{ending}"))
    return root


def _phantom(seed: int, shape=(28, 24, 20), classes: int = 3):
    """A zero-background scan with a body block and up to two structures inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[3:-3, 2:-2, 2:-2] = rng.normal(100, 10, size=(shape[0] - 6, shape[1] - 4, shape[2] - 4))
    label = np.zeros(shape, np.uint8)
    label[6:12, 6:12, 5:10] = 1
    if classes > 2:
        label[14:20, 8:14, 8:14] = 2
    image[label == 1] += 60
    image[label == 2] -= 40
    return image, label


def test_real_la_cases_in_another_orientation_prepare_exactly_and_map_back(la_data_dir, la_root, tmp_path):
    # LA cases as a Decathlon NIfTI dataset with their real spacing and a non-identity orientation
    names = read_list(la_root / "train.list")[:3]
    cases = {}
    for n in names:
        image, label = load_case(la_data_dir, n)
        cases[n] = (image, label)
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "left atrium": 1}, orientation="SRA",
                         spacing=(0.625, 0.625, 0.625))
    direction = sitk.ReadImage(str(src / "imagesTr" / f"{names[0]}_0000.nii.gz")).GetDirection()
    assert not np.allclose(direction, np.eye(3).ravel())                 # the files really are reoriented
    info = prepare(src, tmp_path / "dst", test_fraction=0.34, seed=1)
    assert info["spacing"] == pytest.approx([0.625] * 3) and info["num_classes"] == 2
    assert info["n_labeled_train"] == 2 and info["n_test"] == 1
    test = read_list(tmp_path / "dst" / "test.list")
    assert set(read_list(tmp_path / "dst" / "train.list")) | set(test) == set(names)
    for n in names:
        image, label = load_case(tmp_path / "dst" / "cases", n)
        # LA's volumes have no background floor: the body is every voxel, no crop, same grid as the h5
        src_image, src_label = cases[n]
        np.testing.assert_array_equal(label, src_label)
        expected = (src_image - src_image.mean()) / src_image.std()
        np.testing.assert_allclose(image, expected, rtol=0, atol=2e-5)
        # back onto the source file's own grid: exactly the source label, same size / spacing / origin / direction
        record = info["cases"][n]
        source = sitk.ReadImage(str(src / "labelsTr" / f"{n}.nii.gz"))
        back = to_source_grid(label, record)
        assert back.GetSize() == source.GetSize() and back.GetDirection() == pytest.approx(source.GetDirection())
        assert back.GetOrigin() == pytest.approx(source.GetOrigin()) and back.GetSpacing() == pytest.approx(source.GetSpacing())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(source))


def test_three_classes_unlabeled_pool_crop_lists_and_resampling(tmp_path):
    cases = {f"c{i}": _phantom(i) for i in range(5)}
    cases["u0"] = (_phantom(9)[0], None)
    cases["u1"] = (_phantom(10)[0], None)
    labels = {"background": 0, "atrium": 1, "vessel": 2}
    src = _write_dataset(tmp_path / "src", cases, labels, spacing=(1.0, 1.0, 2.0))
    info = prepare(src, tmp_path / "dst", test_fraction=0.2, seed=0)
    dst = tmp_path / "dst"
    assert info["class_names"] == ["background", "atrium", "vessel"] and info["num_classes"] == 3
    labeled, unlabeled, test = (read_list(dst / f"{k}.list") for k in ("labeled", "unlabeled", "test"))
    assert unlabeled == ["u0", "u1"] and len(test) == 1 and len(labeled) == 4
    assert read_list(dst / "train.list") == labeled + unlabeled          # labeled first: --labeled_num 4
    # cropped to the body (the zero background floor removed), z-score inside it
    image, label = load_case(dst / "cases", labeled[0], with_label=False)[0], None
    with h5py.File(dst / "cases" / labeled[0] / "mri_norm2.h5") as f:
        image, label = f["image"][:], f["label"][:]
        assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == (22, 20, 16) and set(np.unique(label)) == {0, 1, 2}
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-4
    with h5py.File(dst / "cases" / "u0" / "mri_norm2.h5") as f:
        assert "label" not in f
    # another spacing: resampled (2 mm along x halves it), and the label maps back onto the source grid
    info2 = prepare(src, tmp_path / "dst2", spacing=(2.0, 1.0, 2.0), test_fraction=0.2, seed=0)
    rec = info2["cases"]["c1"]
    with h5py.File(tmp_path / "dst2" / "cases" / "c1" / "mri_norm2.h5") as f:
        small = f["label"][:]
    assert rec["prepared_geometry"]["resampled_size"] == [14, 24, 20]
    back = sitk.GetArrayFromImage(to_source_grid(small, rec)).transpose(2, 1, 0)
    src_label = cases["c1"][1]
    for k in (1, 2):
        dice = 2 * ((back == k) & (src_label == k)).sum() / ((back == k).sum() + (src_label == k).sum())
        assert dice > 0.8


def test_rerun_skips_finished_cases_and_an_interrupted_run_resumes(tmp_path):
    cases = {f"c{i}": _phantom(i, classes=2) for i in range(4)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "fg": 1})
    dst = tmp_path / "dst"
    # case c2's label is bad: the run stops there, c0 and c1 are complete, nothing half-written remains
    good = (src / "labelsTr" / "c2.nii.gz").read_bytes()
    _write(src, "c2.nii.gz", cases["c2"][1] * 3)
    with pytest.raises(PrepareError, match=r"c2.nii.gz: label values \[3\]"):
        prepare(src, dst, test_fraction=0.25)
    done = sorted(p.name for p in (dst / "cases").iterdir())
    assert done == ["c0", "c1"] and not list(dst.rglob("*.tmp*")) and not (dst / "dataset.json").exists()
    stamp = (dst / "cases" / "c0" / "mri_norm2.h5").stat().st_mtime_ns
    (src / "labelsTr" / "c2.nii.gz").write_bytes(good)
    prepare(src, dst, test_fraction=0.25)
    assert (dst / "cases" / "c0" / "mri_norm2.h5").stat().st_mtime_ns == stamp      # kept, not redone
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    prepare(src, dst, test_fraction=0.25)                                          # idempotent
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    # a changed setting redoes the cases
    prepare(src, dst, spacing=(2.0, 2.0, 2.0), test_fraction=0.25)
    assert (dst / "cases" / "c0" / "mri_norm2.h5").stat().st_mtime_ns != stamp


def test_ct_normalisation_uses_only_labeled_training_cases(tmp_path):
    cases = {f"c{i}": _phantom(i, classes=2) for i in range(4)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "fg": 1})
    info = prepare(src, tmp_path / "a", modality="ct", test_fraction=0.25, seed=0)
    test_case = read_list(tmp_path / "a" / "test.list")[0]
    img = sitk.ReadImage(str(src / "imagesTr" / f"{test_case}_0000.nii.gz"))
    sitk.WriteImage(img * 5.0, str(src / "imagesTr" / f"{test_case}_0000.nii.gz"))   # only the test case changes
    info2 = prepare(src, tmp_path / "b", modality="ct", test_fraction=0.25, seed=0)
    assert info["ct_normalization"] == info2["ct_normalization"]
    lo, hi = info["ct_normalization"]["clip"]
    assert 100 < lo < hi < 200
    with h5py.File(tmp_path / "b" / "cases" / test_case / "mri_norm2.h5") as f:
        assert f["image"][:].max() <= (hi - info["ct_normalization"]["mean"]) / info["ct_normalization"]["std"] + 1e-4


def _bad(tmp_path, mutate) -> str:
    cases = {f"c{i}": _phantom(i) for i in range(3)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "a": 1, "b": 2})
    mutate(src)
    with pytest.raises(PrepareError) as err:
        prepare(src, tmp_path / "dst", test_fraction=0.34)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "dst").rglob("*.tmp*")) if (tmp_path / "dst").exists() else True
    return str(err.value)


def _write(src, name, arr, spacing=(1.0, 1.0, 1.0), folder="labelsTr"):
    sitk.WriteImage(_image(arr, spacing, origin=(-3.0, 7.5, 2.0)), str(src / folder / name))


def test_every_bad_case_stops_with_one_line_naming_the_file(tmp_path):
    msgs = {
        "shape": _bad(tmp_path / "1", lambda s: _write(s, "c1.nii.gz", np.zeros((28, 24, 19), np.uint8))),
        "spacing": _bad(tmp_path / "2", lambda s: _write(s, "c1.nii.gz", _phantom(1)[1], spacing=(1, 1, 1.5))),
        "values": _bad(tmp_path / "3", lambda s: _write(s, "c1.nii.gz", _phantom(1)[1] * 2)),
        "nan": _bad(tmp_path / "4", lambda s: _write(s, "c1_0000.nii.gz",
                                                     np.where(_phantom(1)[1] > 0, np.nan, 1.0).astype(np.float32),
                                                     folder="imagesTr")),
        "channel": _bad(tmp_path / "5", lambda s: _write(s, "c1_0001.nii.gz", _phantom(1)[0], folder="imagesTr")),
        "unreadable": _bad(tmp_path / "6", lambda s: (s / "labelsTr" / "c0.nii.gz").write_bytes(b"\x00" * 10)),
        "json": _bad(tmp_path / "7", lambda s: (s / "dataset.json").unlink()),
        "labels": _bad(tmp_path / "8", lambda s: (s / "dataset.json").write_text(json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 2}}))),
    }
    assert "labelsTr/c1.nii.gz: label size [28, 24, 19] differs from the image's [28, 24, 20]" in msgs["shape"]
    assert "labelsTr/c1.nii.gz: label spacing [1.0, 1.0, 1.5] differs" in msgs["spacing"]
    assert "labelsTr/c1.nii.gz: label values [4] are not in dataset.json's labels [0, 1, 2]" in msgs["values"]
    assert "imagesTr/c1_0000.nii.gz: the image holds NaN" in msgs["nan"]
    assert "imagesTr/c1_0001.nii.gz: a second channel" in msgs["channel"]
    assert "labelsTr/c0.nii.gz: cannot read the label" in msgs["unreadable"]
    assert "dataset.json: not found" in msgs["json"]
    assert "label values must be 0..K-1" in msgs["labels"]


def test_script_prints_one_line_and_exits_2_on_a_bad_dataset(tmp_path):
    proc = subprocess.run([sys.executable, "prepare_dataset.py", "--src", str(tmp_path / "none"), "--dst",
                           str(tmp_path / "dst"), "--no_progress"], cwd=CODE_DIR, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"prepare_dataset.py: error: {tmp_path / 'none' / 'dataset.json'}: "
                                                f"not found (an nnU-Net / Decathlon dataset folder has a dataset.json)"]
    cases = {f"c{i}": _phantom(i, classes=2) for i in range(3)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "fg": 1})
    info = prepare_dataset.main(["--src", str(src), "--dst", str(tmp_path / "ok"), "--no_progress",
                                 "--test_fraction", "0.34"])
    assert info["n_labeled_train"] == 2 and json.loads((tmp_path / "ok" / "dataset.json").read_text()) == info
