"""Simulated clicks (utils/clicks.py) on constructed masks."""
import pytest
import torch

from utils.clicks import accumulate_clicks, next_clicks

SHAPE = (20, 18, 16)


def _box(lo, hi, shape=SHAPE):
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_first_click_is_centre_of_larger_false_negative_blob():
    # two FN blobs: a 3^3 one and a larger 7^3 one centred at (12, 9, 8); SAM predicts nothing
    target = (_box((1, 1, 1), (4, 4, 4)) | _box((9, 6, 5), (16, 13, 12)))[None]
    pred = torch.zeros_like(target)
    coords, labels = next_clicks(pred, target, click_index=0, generator=_gen())
    assert coords.dtype == torch.int64 and labels.dtype == torch.int64
    assert coords.shape == (1, 1, 3) and labels.shape == (1, 1)
    assert coords[0, 0].tolist() == [12, 9, 8]
    assert labels.item() == 1


def test_false_positive_region_gives_negative_click_at_its_centre():
    target = _box((2, 2, 2), (5, 5, 5))[None]
    pred = target | _box((10, 5, 5), (15, 10, 10))[None]  # FP 5^3 blob, larger than nothing else
    coords, labels = next_clicks(pred, target, 0, _gen())
    assert coords[0, 0].tolist() == [12, 7, 7]
    assert labels.item() == 0


def test_larger_region_wins_over_deeper_one():
    # FP slab 2 voxels thick (2x14x12 = 336 voxels, depth 1) versus a compact FN cube (5^3 = 125
    # voxels, depth 3): the larger region wins (the official RITM picked the deeper one)
    target = _box((10, 3, 3), (15, 8, 8))[None]
    slab = _box((6, 2, 2), (8, 16, 14))[None]
    coords, labels = next_clicks(slab, target, 0, _gen())
    x, y, z = coords[0, 0].tolist()
    assert slab[0, x, y, z]
    assert labels.item() == 0


def test_volume_border_counts_as_boundary():
    # FN box 5x5x5 touching the x = 0 border: with the border as boundary the unique deepest voxel is
    # the box centre (2, 4, 4); an EDT without padding would rate x = 0 as deep as x = 2 and pick x = 0
    target = _box((0, 2, 2), (5, 7, 7))[None]
    coords, labels = next_clicks(torch.zeros_like(target), target, 0, _gen())
    assert coords[0, 0].tolist() == [2, 4, 4]
    assert labels.item() == 1


def test_batch_gets_per_sample_edt_clicks_and_labels():
    # sample 0: a FN blob; sample 1: a FP blob elsewhere (official code reused sample 0's EDT)
    t0 = _box((3, 3, 3), (8, 8, 8))
    p0 = torch.zeros(SHAPE, dtype=torch.bool)
    t1 = torch.zeros(SHAPE, dtype=torch.bool)
    p1 = _box((11, 9, 7), (18, 16, 14))
    coords, labels = next_clicks(torch.stack([p0, p1]), torch.stack([t0, t1]), 0, _gen())
    assert coords[0, 0].tolist() == [5, 5, 5] and labels[0].item() == 1
    assert coords[1, 0].tolist() == [14, 12, 10] and labels[1].item() == 0


def test_label_read_at_the_clicked_voxel_not_off_by_one():
    # Many random later clicks: every label must equal FN-ness of its own voxel. The official
    # indexing (point = (channel, x, y, z) used as (x, y, z)) made nearly all labels 0.
    target = _box((0, 0, 0), (10, 18, 16))
    pred = _box((5, 0, 0), (20, 18, 16))
    fn, fp = target & ~pred, pred & ~target
    batch = torch.stack([pred] * 8), torch.stack([target] * 8)
    g = _gen(3)
    positives = 0
    for k in range(1, 6):
        coords, labels = next_clicks(*batch, click_index=k, generator=g)
        for b in range(8):
            x, y, z = coords[b, 0].tolist()
            assert fn[x, y, z] or fp[x, y, z]
            assert labels[b].item() == int(fn[x, y, z])
            positives += labels[b].item()
    # half the error voxels are FN: 40 draws -> the positive share is far from 0 and from 40
    assert 8 <= positives <= 32


def test_later_clicks_are_uniform_over_error_voxels_and_deterministic():
    target = _box((2, 2, 2), (4, 4, 4))[None]  # 8 FN voxels
    pred = _box((10, 10, 10), (12, 12, 12))[None]  # 8 FP voxels
    err = (target & ~pred) | (pred & ~target)
    n = 1600
    coords, labels = next_clicks(pred.expand(n, *SHAPE), target.expand(n, *SHAPE), 1, _gen(7))
    assert err[0][tuple(coords[:, 0].T)].all()
    hits = torch.zeros(SHAPE, dtype=torch.long)
    hits.index_put_(tuple(coords[:, 0].T), torch.ones(n, dtype=torch.long), accumulate=True)
    counts = hits[err[0]]
    assert counts.numel() == 16 and counts.min() >= 60 and counts.max() <= 145  # expected 100 each
    again, again_labels = next_clicks(pred.expand(n, *SHAPE), target.expand(n, *SHAPE), 1, _gen(7))
    assert torch.equal(coords, again) and torch.equal(labels, again_labels)
    other, _ = next_clicks(pred.expand(n, *SHAPE), target.expand(n, *SHAPE), 1, _gen(8))
    assert not torch.equal(coords, other)


def test_edt_clicks_parameter_switches_to_random_clicks():
    target = _box((3, 3, 3), (12, 12, 12))[None]
    pred = torch.zeros_like(target)
    centre = [7, 7, 7]
    assert next_clicks(pred, target, 2, _gen(), edt_clicks=3)[0][0, 0].tolist() == centre
    draws = {tuple(next_clicks(pred, target, 2, _gen(s), edt_clicks=2)[0][0, 0].tolist())
             for s in range(5)}
    assert len(draws) > 1


def test_no_error_clicks_inside_target_positive_or_anywhere_negative():
    target = _box((4, 4, 4), (7, 7, 7))
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    pred = torch.stack([target, empty])
    tgt = torch.stack([target, empty])
    for k in (0, 4):
        coords, labels = next_clicks(pred, tgt, k, _gen(k))
        x, y, z = coords[0, 0].tolist()
        assert target[x, y, z] and labels[0].item() == 1
        assert labels[1].item() == 0
        assert all(0 <= c < s for c, s in zip(coords[1, 0].tolist(), SHAPE))


def test_shape_errors_and_accumulation():
    a = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        next_clicks(a, a[:1], 0, _gen())
    with pytest.raises(ValueError, match=r"\(B, X, Y, Z\)"):
        next_clicks(a[0], a[0], 0, _gen())
    c1, l1 = torch.zeros(2, 1, 3, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    c2, l2 = torch.ones(2, 1, 3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    hist = accumulate_clicks(None, c1, l1)
    coords, labels = accumulate_clicks(hist, c2, l2)
    assert coords.shape == (2, 2, 3) and labels.tolist() == [[1, 0], [1, 0]]
    assert coords[:, 1].eq(1).all() and coords[:, 0].eq(0).all()
    with pytest.raises(ValueError, match="batch size 1"):
        accumulate_clicks((coords, labels), c1[:1], l1[:1])


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_two_level_kth_true_voxel_matches_a_plain_scan(monkeypatch, block):
    # the random click picks the k-th error voxel in C order; the two-level search must agree with a
    # scan of all voxels for every k, across block boundaries and with a partial last block
    import utils.clicks as clicks
    monkeypatch.setattr(clicks, "_BLOCK", block)
    g = torch.Generator().manual_seed(block)
    n = 3 * block + 5
    pool = torch.rand(3, n, generator=g) < torch.tensor([[0.02], [0.5], [0.97]])
    pool[0, -1] = True  # a True voxel in the partial last block
    for row in range(3):
        expected = torch.nonzero(pool[row]).squeeze(1)
        ks = torch.arange(expected.numel())
        got = clicks._kth_true(pool[row].expand(ks.numel(), n).contiguous(), ks)
        assert torch.equal(got, expected)


def test_random_clicks_depend_only_on_the_error_voxels_not_on_the_volume_around_them():
    # the generalist decides clicks on the patch region only; error voxels, their C order and the
    # generator's draws are the same, so cropping the volume just shifts the clicks
    target = _box((2, 2, 2), (6, 9, 5))[None]
    pred = _box((4, 4, 4), (8, 7, 6))[None]
    big_target, big_pred = (torch.nn.functional.pad(m, (3, 2, 1, 4, 5, 0)) for m in (target, pred))
    for k in range(3):
        small = next_clicks(pred, target, k, _gen(k))
        big = next_clicks(big_pred, big_target, k, _gen(k))
        assert torch.equal(small[0] + torch.tensor([5, 1, 3]), big[0]) and torch.equal(small[1], big[1])


def test_fast_distance_transform_gives_the_same_deepest_voxels_as_scipy(monkeypatch):
    # edt (a requirement) and scipy's fallback must pick the same click, ties included
    import numpy as np
    from scipy import ndimage

    import utils.clicks as clicks
    assert clicks._edt is not None, "edt is in requirements.txt: the fast path must be the one tested here"
    rng = np.random.default_rng(3)
    cases = [ndimage.binary_opening(rng.random((40, 36, 30)) > p) for p in (0.2, 0.3)]
    cases.append(rng.random((40, 36, 30)) > 0.4)
    cases += [np.ones((9, 9, 9), bool), np.pad(np.ones((4, 6, 4), bool), 3)]  # many exact ties
    fast = [clicks._deepest_voxel_of_largest_region(m, np.zeros_like(m)) for m in cases]
    assert all(v is not None for v in fast)
    monkeypatch.setattr(clicks, "_edt", None)
    slow = [clicks._deepest_voxel_of_largest_region(m, np.zeros_like(m)) for m in cases]
    assert fast == slow
    assert fast[3] == (4, 4, 4)


def test_batched_cropped_labelling_gives_the_plain_computations_voxels():
    # _deepest_voxels labels each error mask on its bounding box, in threads: the same clicks as labelling
    # the whole volume, including ties between equal-sized components (the lower label wins) and FN/FP ties
    import numpy as np
    from scipy import ndimage

    import utils.clicks as clicks
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(120):
        shape = tuple(int(n) for n in rng.integers(3, 22, size=3))
        batch = int(rng.integers(1, 4))
        target = torch.from_numpy(rng.random((batch,) + shape) < rng.uniform(0.02, 0.7))
        if trial % 3 == 0:
            pred = torch.zeros_like(target)
        elif trial % 3 == 1:
            pred = torch.from_numpy(rng.random((batch,) + shape) < rng.uniform(0.0, 0.7))
        else:
            pred = torch.from_numpy(ndimage.binary_opening(rng.random((batch,) + shape) < 0.6,
                                                           structure=np.ones((1, 3, 3, 3))))
        fn, fp = target & ~pred, pred & ~target
        plain = [clicks._deepest_voxel_of_largest_region(fn[b].numpy(), fp[b].numpy()) for b in range(batch)]
        assert clicks._deepest_voxels(fn, fp) == plain
        checked += sum(v is not None for v in plain)
    # equal-sized components away from the origin: the crop must keep their numbering
    two = torch.zeros((1, 12, 12, 12), dtype=torch.bool)
    two[0, 6:9, 6:9, 2:5] = True
    two[0, 6:9, 6:9, 8:11] = True
    assert clicks._deepest_voxels(two, torch.zeros_like(two)) == [(7, 7, 3)]
    # an FN and an FP region of the same size: FN wins
    fp_tie = torch.zeros_like(two)
    fp_tie[0, 1:4, 1:4, 1:4] = True
    assert clicks._deepest_voxels(two & (torch.arange(12) < 6), fp_tie) == [(7, 7, 3)]
    assert checked > 150
