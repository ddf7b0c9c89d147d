"""No label of an unlabeled scan can influence training.

Four real LA cases are copied into tmp_path (2 labeled, 2 unlabeled). In other copies the *unlabeled* cases'
label datasets are replaced by garbage: random {0, 1} noise, and a wrong-shape array of invalid values (which
the data layer would reject if it ever read it). Seeded runs end with bit-identical weights. As a control,
changing a *labeled* case's label does change the weights, so the comparison can detect a difference.
"""
import shutil

import h5py
import numpy as np
import pytest

from training.run import main

from test_train_common import (one_thread,  # noqa: F401 (autouse)
                               assert_identical, run_args, sam_args, weights, write_tiny_sam)

N_LABELED, N_CASES = 2, 4


def _copy(la_data_dir, names, dst):
    for n in names:
        (dst / n).mkdir(parents=True)
        shutil.copy(la_data_dir / n / "mri_norm2.h5", dst / n / "mri_norm2.h5")
    return dst


def _replace_label(h5_path, make):
    with h5py.File(h5_path, "r+") as f:
        shape = f["label"].shape
        del f["label"]
        f.create_dataset("label", data=make(shape))


@pytest.fixture(scope="module")
def copies(la_root, la_data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("leak")
    names = [s.strip() for s in (la_root / "train.list").read_text().splitlines() if s.strip()][:N_CASES]
    train_list = base / "train.list"
    train_list.write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    variants = {
        "clean": None,
        "random": lambda shape: rng.integers(0, 2, size=shape, dtype=np.uint8),
        "wrong_shape": lambda shape: np.full((7, 5, 3), 9, dtype=np.uint8),
    }
    roots = {}
    for name, make in variants.items():
        root = _copy(la_data_dir, names, base / name / "cases")
        if make is not None:
            for n in names[N_LABELED:]:
                _replace_label(root / n / "mri_norm2.h5", make)
        roots[name] = root
    control = _copy(la_data_dir, names, base / "control" / "cases")
    _replace_label(control / names[0] / "mri_norm2.h5", lambda shape: 1 - np.zeros(shape, dtype=np.uint8))
    roots["control"] = control
    sam, cfg_json = write_tiny_sam(base / "sam")
    return dict(train_list=train_list, roots=roots, sam=sam, cfg_json=cfg_json)


METHODS = {
    "uamt": ({"specialist": "uamt", "generalist_term": "none"}, False),
    "semisam": ({"specialist": "mt", "generalist_term": "semisam", "prompt": "point"}, True),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_garbage_labels_of_unlabeled_scans_change_nothing(method, copies, tmp_path):
    settings, with_sam = METHODS[method]

    def run(variant):
        args = run_args(copies["roots"][variant], copies["train_list"], tmp_path, f"{method}_{variant}", iters=3)
        if with_sam:
            args += sam_args([copies["sam"]], copies["cfg_json"])
        return weights(main(settings, args))

    clean = run("clean")
    assert_identical(clean, run("random"))
    assert_identical(clean, run("wrong_shape"))
    if method == "semisam":
        control = run("control")
        with pytest.raises(AssertionError, match="differs"):
            assert_identical(clean, control)
