"""predict.py: new scans (no label) -> label maps on each scan's own grid; prepare -> train -> predict on real LA."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from dataloaders.la_heart import load_case, read_list
from dataloaders.prepare import PrepareError, prepare_dataset, to_xyz
from networks.vnet import VNet
from training.run import main as train_main
from utils.errors import ConfigError
from utils.inference import CheckpointError, largest_component_per_class, load_specialist, sliding_window_predict
from tests.test_prepare_dataset import _phantom, _write_dataset
from tests.test_train_common import run_args

CODE_DIR = Path(__file__).resolve().parents[1]


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


def test_prepare_train_predict_real_la_scans_in_their_own_geometry(la_root, la_data_dir, tmp_path):
    names = read_list(la_root / "train.list")[:4]
    src = _write_dataset(tmp_path / "src", {n: load_case(la_data_dir, n) for n in names},
                         {"background": 0, "left atrium": 1}, orientation="SRA", spacing=(0.625, 0.625, 0.625))
    dst = tmp_path / "prepared"
    info = prepare_dataset(src, dst, test_fraction=0.25, seed=0)
    # a few iterations of MT on the prepared folder, as a user would run it
    trainer = train_main({"specialist": "mt"}, run_args(dst / "cases", dst / "train.list", tmp_path / "model", "mt",
                                                        "--save_every", "2", iters=2))
    ckpt = tmp_path / "model" / "mt" / "iter_2.pth"
    assert ckpt.is_file() and trainer.iteration == 2
    scans = tmp_path / "new_scans"
    scans.mkdir()
    test_case = read_list(dst / "test.list")[0]
    for n in (test_case, names[0]):
        (scans / f"{n}_0000.nii.gz").write_bytes((src / "imagesTr" / f"{n}_0000.nii.gz").read_bytes())
    outputs = predict.main(["--model_path", str(ckpt), "--input", str(scans), "--output", str(tmp_path / "pred"),
                            "--dataset", str(dst), "--stride_xy", "48", "--stride_z", "32", "--no_progress"])
    assert sorted(o.name for o in outputs) == sorted(f"{n}.nii.gz" for n in (test_case, names[0]))
    net, _ = load_specialist(ckpt)
    for n in (test_case, names[0]):
        source = sitk.ReadImage(str(scans / f"{n}_0000.nii.gz"))
        pred = sitk.ReadImage(str(tmp_path / "pred" / f"{n}.nii.gz"))
        _same_grid(pred, source)                                         # the input's own grid, exactly
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}
        # back through the preprocessing (reorientation, crop): the voxels the network predicted on its grid with
        # the training patch (read from config.json beside the checkpoint; LA's 112x112x80 would differ)
        image, _ = load_case(dst / "cases", n, with_label=False)
        on_grid, _ = sliding_window_predict(net, image, trainer.cfg.patch_size, 48, 32)
        box = info["cases"][n]["prepared_geometry"]["crop_box_in_resampled"]
        forward = to_xyz(sitk.DICOMOrient(pred, "LPS"))[tuple(slice(a, b) for a, b in box)]
        np.testing.assert_array_equal(forward, largest_component_per_class(on_grid))
    with pytest.raises(ConfigError, match="exists .*--overwrite"):
        predict.main(["--model_path", str(ckpt), "--input", str(scans), "--output", str(tmp_path / "pred"),
                      "--dataset", str(dst), "--no_progress"])


def test_three_class_prediction_on_a_resampled_dataset(tmp_path):
    cases = {f"c{i}": _phantom(i) for i in range(3)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "a": 1, "b": 2}, orientation="RAI",
                         spacing=(1.0, 1.0, 2.0))
    dst = tmp_path / "prepared"
    prepare_dataset(src, dst, spacing=(1.5, 1.5, 1.5), test_fraction=0.34)
    torch.manual_seed(0)
    ckpt = tmp_path / "three.pth"
    torch.save(VNet(n_classes=3, n_filters=4).state_dict(), ckpt)
    out = predict.main(["--model_path", str(ckpt), "--input", str(src / "imagesTr" / "c1_0000.nii.gz"),
                        "--output", str(tmp_path / "pred"), "--dataset", str(dst), "--patch_size", "16", "16", "16",
                        "--stride_xy", "8", "--stride_z", "8", "--no_lcc", "--no_progress"])
    pred = sitk.ReadImage(str(out[0]))
    _same_grid(pred, sitk.ReadImage(str(src / "imagesTr" / "c1_0000.nii.gz")))
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
    binary = tmp_path / "binary.pth"
    torch.save(VNet(n_classes=2, n_filters=4).state_dict(), binary)
    with pytest.raises(CheckpointError, match="2 output classes but the dataset has 3 labels"):
        predict.main(["--model_path", str(binary), "--input", str(src / "imagesTr"), "--output",
                      str(tmp_path / "p2"), "--dataset", str(dst), "--no_progress"])


def test_largest_component_per_class():
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:3, 0:3, 0:3] = 1
    label[6:7, 6:7, 6:7] = 1
    label[5:9, 0:2, 0:2] = 2
    label[0, 9, 9] = 2
    out = largest_component_per_class(label)
    assert (out == 1).sum() == 27 and (out == 2).sum() == 16 and out[6, 6, 6] == 0 and out[0, 9, 9] == 0


def test_script_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "predict.py", "--model_path", str(tmp_path / "m.pth"), "--input",
                           str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--no_progress"], cwd=CODE_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"predict.py: error: {tmp_path / 'nothing'}: no such file or folder"]


def test_per_class_evaluation_of_a_prepared_dataset(tmp_path):
    import test as test_script
    from utils.inference import class_metrics
    cases = {f"c{i}": _phantom(i) for i in range(4)}
    src = _write_dataset(tmp_path / "src", cases, {"background": 0, "a": 1, "b": 2}, spacing=(1.0, 1.0, 2.0))
    dst = tmp_path / "prepared"
    prepare_dataset(src, dst, test_fraction=0.5, seed=0)
    torch.manual_seed(0)
    ckpt = tmp_path / "three.pth"
    torch.save(VNet(n_classes=3, n_filters=4).state_dict(), ckpt)
    summary = test_script.main(["--dataset", str(dst), "--model_path", str(ckpt), "--patch_size", "16", "16", "16",
                                "--stride_xy", "8", "--stride_z", "8", "--out_dir", str(tmp_path / "eval"),
                                "--device", "cpu"])
    assert list(summary["per_class"]) == ["a", "b"] and summary["n_cases"] == 2 and summary["distance_unit"] == "mm"
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,jaccard,hd95_mm,asd_mm" and len(rows) == 1 + 2 * 2
    for c in summary["per_class"].values():
        assert 0 <= c["mean"]["dice"] <= 1 and c["n"] <= 2
    # the per-class rule: absent from both -> NaN (left out of means); one side empty -> Dice 0
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    m = class_metrics(label, label, 3, spacing=(2.0, 1.0, 1.0))
    assert m[1]["dice"] == 1.0 and m[1]["hd95"] == 0.0 and np.isnan(m[2]["dice"])
    assert class_metrics(np.zeros_like(label), label, 2)[1]["dice"] == 0.0
