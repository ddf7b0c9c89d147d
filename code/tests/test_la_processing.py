"""Raw challenge NRRD -> mri_norm2.h5 conversion (UA-MT's la_heart_processing semantics, seeded)."""
import zlib

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dataloaders.la_heart import LADataError, LAHeart, load_case
from dataloaders.la_heart_processing import convert_case, main

SHAPE = (160, 150, 100)           # (X, Y, Z): all different, so any axis swap changes shapes
SPACING = (0.625, 0.7, 2.5)       # anisotropic, (x, y, z) mm
BOX = ((30, 129), (35, 114), (15, 85))  # inclusive label bounding box; margins keep every official bound inside


def make_volumes(seed=0):
    """(image int16 (X,Y,Z), mask uint8 (X,Y,Z) with 255 = atrium and some 128 = not atrium)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    image = (3 * x + 2 * y + 40 * z + rng.integers(0, 50, SHAPE)).astype(np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = BOX
    mask[x0:x1 + 1, y0:y1 + 1, z0:z1 + 1] = 255 * (rng.random((x1 - x0 + 1, y1 - y0 + 1, z1 - z0 + 1)) > 0.3)
    for corner in BOX[0][0], BOX[0][1]:  # make the bounding box exact
        mask[corner, y0, z0] = 255
    mask[x0, y1, z1] = 255
    mask[60:70, 50:60, 40] = 128  # not 255: background in the official conversion
    return image, mask


def write_nrrd_sitk(path, array_xyz, spacing):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), True)


def write_nrrd_raw(path, array_xyz, spacing):
    """Hand-written NRRD, as the challenge files: x is the fastest axis on disk (what pynrrd returns as [x,y,z])."""
    types = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short"}
    dirs = " ".join(f"({','.join(str(spacing[i] if j == i else 0) for j in range(3))})" for i in range(3))
    header = (f"NRRD0004\ntype: {types[array_xyz.dtype]}\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(map(str, array_xyz.shape))}\nspace directions: {dirs}\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + array_xyz.astype(array_xyz.dtype.newbyteorder("<")).tobytes(order="F"))


def write_raw_case(root, case, writer, image=None, mask=None, seed=0):
    vol_image, vol_mask = make_volumes(seed)
    image = vol_image if image is None else image
    mask = vol_mask if mask is None else mask
    (root / case).mkdir(parents=True, exist_ok=True)
    writer(root / case / "lgemri.nrrd", image, SPACING)
    writer(root / case / "laendo.nrrd", mask, SPACING)
    return image, mask


def official_bounds(case, seed):
    """The official script's six bounds from the bounding box, with the documented per-case generator."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(case.encode())]))
    (x0, x1), (y0, y1), (z0, z1) = BOX
    px, py, pz = (112 - (x1 - x0)) // 2, (112 - (y1 - y0)) // 2, (80 - (z1 - z0)) // 2  # 6, 16, 5
    m = [int(rng.integers(10, 20)) for _ in range(4)] + [int(rng.integers(5, 10)) for _ in range(2)]
    return ((max(x0 - m[0] - px, 0), min(x1 + m[1] + px, SHAPE[0])),
            (max(y0 - m[2] - py, 0), min(y1 + m[3] + py, SHAPE[1])),
            (max(z0 - m[4] - pz, 0), min(z1 + m[5] + pz, SHAPE[2])))


def expected_crop(case, seed):
    """Official quirk: the z bounds are computed but not applied."""
    x, y, _ = official_bounds(case, seed)
    return x, y, (0, SHAPE[2])


@pytest.mark.parametrize("writer", [write_nrrd_sitk, write_nrrd_raw])
def test_convert_case_official_semantics(tmp_path, writer):
    image, mask = write_raw_case(tmp_path / "raw", "CASE01", writer)
    info = convert_case(tmp_path / "raw" / "CASE01", tmp_path / "out" / "CASE01", seed=3)
    crop = expected_crop("CASE01", 3)
    (cx0, cx1), (cy0, cy1), _ = crop
    assert 5 <= cx0 <= 14 and 145 <= cx1 <= 154 and 0 <= cy0 <= 9 and 140 <= cy1 <= 149  # a real crop
    z0, z1 = official_bounds("CASE01", 3)[2]
    assert 1 <= z0 <= 5 and 95 <= z1 <= 99  # an applied z crop would show
    assert info["crop"] == crop and info["case"] == "CASE01"
    assert info["shape"] == (cx1 - cx0, cy1 - cy0, SHAPE[2])  # full z: official quirk
    assert info["spacing"] == pytest.approx(SPACING)
    z = (image - image.astype(np.float64).mean()) / image.astype(np.float64).std()  # over the uncropped volume
    with h5py.File(tmp_path / "out" / "CASE01" / "mri_norm2.h5", "r") as f:
        assert set(f.keys()) == {"image", "label"}
        assert f["image"].compression == "gzip" and f["label"].compression == "gzip"
        assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
        np.testing.assert_allclose(f["image"][()], z[cx0:cx1, cy0:cy1, :], rtol=0, atol=1e-5)
        assert np.array_equal(f["label"][()], (mask == 255)[cx0:cx1, cy0:cy1, :].astype(np.uint8))
        assert f.attrs["spacing"] == pytest.approx(SPACING)
        assert f.attrs["crop"].tolist() == [list(c) for c in crop]
    assert not (tmp_path / "out" / "CASE01" / ".mri_norm2.h5.tmp").exists()


def test_determinism_and_seed_dependence(tmp_path):
    write_raw_case(tmp_path / "raw", "CASE01", write_nrrd_sitk)
    a = convert_case(tmp_path / "raw" / "CASE01", tmp_path / "a" / "CASE01", seed=0)
    b = convert_case(tmp_path / "raw" / "CASE01", tmp_path / "b" / "CASE01", seed=0)
    assert a == b
    for key in ("image", "label"):
        with h5py.File(tmp_path / "a/CASE01/mri_norm2.h5") as fa, h5py.File(tmp_path / "b/CASE01/mri_norm2.h5") as fb:
            assert np.array_equal(fa[key][()], fb[key][()])
    crops = [convert_case(tmp_path / "raw" / "CASE01", tmp_path / f"s{s}" / "CASE01", seed=s)["crop"]
             for s in range(3)]
    assert crops == [expected_crop("CASE01", s) for s in range(3)] and len(set(crops)) > 1


def test_errors_name_the_case(tmp_path):
    image, mask = make_volumes()
    write_raw_case(tmp_path / "raw", "EMPTY", write_nrrd_sitk, mask=np.where(mask == 255, 1, 0).astype(np.uint8))
    with pytest.raises(LADataError, match=r"LA case 'EMPTY': .*laendo\.nrrd has no voxel equal to 255"):
        convert_case(tmp_path / "raw" / "EMPTY", tmp_path / "out" / "EMPTY", 0)
    write_raw_case(tmp_path / "raw", "SHAPE", write_nrrd_sitk, mask=mask[:, :, :90])
    with pytest.raises(LADataError, match=r"LA case 'SHAPE': lgemri\.nrrd has shape \(160, 150, 100\) but "
                                          r"laendo\.nrrd has \(160, 150, 90\)"):
        convert_case(tmp_path / "raw" / "SHAPE", tmp_path / "out" / "SHAPE", 0)
    (tmp_path / "raw" / "SHAPE" / "laendo.nrrd").unlink()
    with pytest.raises(LADataError, match=r"LA case 'SHAPE': .*laendo\.nrrd not found"):
        convert_case(tmp_path / "raw" / "SHAPE", tmp_path / "out" / "SHAPE", 0)
    assert not (tmp_path / "out" / "EMPTY" / "mri_norm2.h5").exists()


def test_cli_with_split_lists_feeds_the_dataset(tmp_path, capsys):
    raw = tmp_path / "raw"
    for i, case in enumerate(["B_CASE", "A_CASE", "C_CASE"]):
        write_raw_case(raw, case, write_nrrd_sitk, seed=i)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.list").write_text("B_CASE\nA_CASE\n")
    (lists / "test.list").write_text("C_CASE\n")
    dst = tmp_path / "data" / "2018LA_Seg_Training Set"
    assert main(["--src", str(raw), "--dst", str(dst), "--seed", "0", "--split-like", str(lists)]) == 0
    assert "converted 3 case(s)" in capsys.readouterr().out
    assert (tmp_path / "data" / "train.list").read_text() == "B_CASE\nA_CASE\n"
    ds = LAHeart(dst, split="train")
    assert ds.cases == ["B_CASE", "A_CASE"]
    item = ds[1]
    assert item["case"] == "A_CASE" and item["labeled"] and item["image"].shape[-1] == SHAPE[2]
    image, label = load_case(dst, "C_CASE")
    assert image.dtype == np.float32 and set(np.unique(label).tolist()) == {0, 1}
    # per-case generator: converting one case alone gives the same file as the batch run
    alone = convert_case(raw / "A_CASE", tmp_path / "alone" / "A_CASE", seed=0)
    with h5py.File(dst / "A_CASE" / "mri_norm2.h5") as f:
        assert f.attrs["crop"].tolist() == [list(c) for c in alone["crop"]]
    (lists / "test.list").write_text("C_CASE\nMISSING\n")
    with pytest.raises(LADataError, match=r"test\.list names 1 case\(s\) not converted.*MISSING"):
        main(["--src", str(raw), "--dst", str(dst), "--split-like", str(lists)])
    with pytest.raises(LADataError, match=r"no case folder with lgemri\.nrrd under"):
        main(["--src", str(lists), "--dst", str(dst)])
