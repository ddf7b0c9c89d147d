"""calculate_metric_percase: equal to medpy on real LA labels; never flattering on empty masks."""
import math

import h5py
import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from utils.metrics import calculate_metric_percase, volume_diagonal


def medpy_metrics(pred, gt, spacing=None):
    return (medpy_binary.dc(pred, gt), medpy_binary.jc(pred, gt),
            medpy_binary.hd95(pred, gt, voxelspacing=spacing), medpy_binary.asd(pred, gt, voxelspacing=spacing))


def shifted(mask, offset):
    out = np.zeros_like(mask)
    src = tuple(slice(max(-o, 0), mask.shape[i] - max(o, 0)) for i, o in enumerate(offset))
    dst = tuple(slice(max(o, 0), mask.shape[i] - max(-o, 0)) for i, o in enumerate(offset))
    out[dst] = mask[src]
    return out


def with_blob(mask):
    out = mask.copy()
    out[2:8, 3:9, 1:5] = 1  # spurious component in a corner, far from the atrium
    return out


PERTURBATIONS = {
    "dilated": lambda m: ndimage.binary_dilation(m, iterations=2),
    "eroded": lambda m: ndimage.binary_erosion(m, iterations=3),
    "shifted": lambda m: shifted(m, (4, -3, 2)),
    "blob": with_blob,
}


@pytest.fixture(scope="module")
def real_labels(la_root, la_data_dir):
    cases = (la_root / "test.list").read_text().split()[:2]
    labels = []
    for case in cases:
        with h5py.File(la_data_dir / case / "mri_norm2.h5", "r") as f:
            labels.append(f["label"][:])
    return labels


# Each case gets two perturbations (keeps medpy's run time small); every perturbation is checked once,
# with and without spacing; one anisotropic spacing guards the axis order.
@pytest.mark.parametrize("case_idx,kind", [(0, "dilated"), (0, "shifted"), (1, "eroded"), (1, "blob")])
@pytest.mark.parametrize("spacing", [None, 0.625])
def test_equals_medpy_on_real_la_labels(real_labels, case_idx, kind, spacing):
    gt = real_labels[case_idx]
    pred = PERTURBATIONS[kind](gt).astype(np.uint8)
    assert 0 < pred.sum() and not np.array_equal(pred != 0, gt != 0)
    ours = calculate_metric_percase(pred, gt, spacing=spacing)
    ref = medpy_metrics(pred, gt, spacing)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    assert all(isinstance(v, float) for v in ours)


def test_equals_medpy_with_anisotropic_spacing(real_labels):
    gt = real_labels[0]
    pred = shifted(gt, (0, 0, 5))
    spacing = (0.625, 1.0, 2.5)
    np.testing.assert_allclose(calculate_metric_percase(pred, gt, spacing), medpy_metrics(pred, gt, spacing), rtol=1e-6)
    # shifting along z by 5 voxels of 2.5 mm: distances must be in mm along that axis
    assert calculate_metric_percase(pred, gt, spacing)[2] > calculate_metric_percase(pred, gt, 0.625)[2]


@pytest.mark.parametrize("seed", range(4))
def test_equals_medpy_on_masks_touching_the_volume_edge(seed):
    rng = np.random.default_rng(seed)
    shape = (23, 17, 11)
    gt = ndimage.binary_opening(rng.random(shape) < 0.5)
    gt[0, :6, :4] = gt[:5, -1, -3:] = True  # foreground on the volume edge: surface there too
    pred = ndimage.binary_dilation(gt) ^ (rng.random(shape) < 0.05)
    np.testing.assert_allclose(calculate_metric_percase(pred, gt), medpy_metrics(pred, gt), rtol=1e-6)
    np.testing.assert_allclose(calculate_metric_percase(pred, gt, (0.5, 1, 2)), medpy_metrics(pred, gt, (0.5, 1, 2)),
                               rtol=1e-6)


def test_identical_masks_score_perfectly():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[5:12, 6:15, 4:9] = 1
    assert calculate_metric_percase(gt, gt, 0.625) == (1.0, 1.0, 0.0, 0.0)


def test_known_values_for_a_shifted_cube():
    gt = np.zeros((30, 30, 30), bool)
    gt[10:20, 10:20, 10:20] = True
    pred = shifted(gt, (2, 0, 0))
    dice, jac, hd95, asd = calculate_metric_percase(pred, gt, spacing=0.5)
    assert dice == pytest.approx(2 * 800 / 2000)
    assert jac == pytest.approx(800 / 1200)
    assert hd95 == pytest.approx(1.0)  # 2 voxels x 0.5 mm on the faces perpendicular to the shift
    assert 0 < asd < hd95


@pytest.mark.parametrize("spacing,expected", [(None, math.sqrt(40 ** 2 + 30 ** 2 + 20 ** 2)),
                                              (0.625, 0.625 * math.sqrt(40 ** 2 + 30 ** 2 + 20 ** 2)),
                                              ((1.0, 2.0, 0.5), math.sqrt(40 ** 2 + 60 ** 2 + 10 ** 2))])
def test_empty_masks_are_never_flattering(spacing, expected):
    shape = (40, 30, 20)
    empty = np.zeros(shape, np.uint8)
    full = np.zeros(shape, np.uint8)
    full[10:20, 10:20, 5:10] = 1
    assert volume_diagonal(shape, spacing) == pytest.approx(expected)
    assert calculate_metric_percase(empty, full, spacing) == pytest.approx((0.0, 0.0, expected, expected))
    assert calculate_metric_percase(full, empty, spacing) == pytest.approx((0.0, 0.0, expected, expected))
    assert calculate_metric_percase(empty, empty, spacing) == (1.0, 1.0, 0.0, 0.0)
    # worse than the worst non-empty prediction: a single voxel in the far corner
    corner = np.zeros(shape, np.uint8)
    corner[-1, -1, -1] = 1
    far = calculate_metric_percase(corner, full, spacing)
    assert far[2] < expected and far[3] < expected


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 4\).*\(4, 4, 5\)"):
        calculate_metric_percase(np.ones((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        calculate_metric_percase(np.ones((4, 4, 4)), np.ones((4, 4, 4)), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        calculate_metric_percase(np.ones((4, 4, 4)), np.ones((4, 4, 4)), spacing=0)
