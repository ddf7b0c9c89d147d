"""Sliding-window inference (vs. the official loop), post-processing, and the test_LA.py script on real data."""
import argparse
import csv
import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test_LA
from dataloaders.la_heart import load_case
from networks.vnet import VNet
from training.timing import SectionTimer
from utils.inference import (CheckpointError, _memory_format, can_fuse_conv_relu, canonical_strides, fold_batchnorm,
                             fuse_conv_relu, largest_connected_component, load_specialist, sliding_window_predict, window_starts)
from utils import bf16
from utils import inference as inference_module
from utils.bf16 import native_cpu_bf16
from utils.metrics import calculate_metric_percase


def official_test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes):
    """UA-MT test_util.test_single_case semantics, one window at a time, numpy accumulation."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for s, p in zip(image.shape, patch_size)]
    (wl, hl, dl) = (p // 2 for p in pads)
    add_pad = any(pads)
    if add_pad:
        image = np.pad(image, [(p // 2, p - p // 2) for p in pads], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = image[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]]
                with torch.no_grad():
                    y1 = net(torch.from_numpy(patch[None, None].astype(np.float32)))
                prob = F.softmax(y1, dim=1).numpy()[0]
                score_map[:, xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += prob
                cnt[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += 1
    score_map = score_map / cnt[None]
    label_map = np.argmax(score_map, axis=0)
    if add_pad:
        label_map = label_map[wl:wl + w, hl:hl + h, dl:dl + d]
        score_map = score_map[:, wl:wl + w, hl:hl + h, dl:dl + d]
    return label_map, score_map


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(3)
    net = VNet(n_filters=4, normalization="batchnorm")
    with torch.no_grad():  # non-trivial BN statistics so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("shape", [(45, 38, 27), (20, 40, 10)])  # non-divisible; smaller than the patch
def test_sliding_window_matches_official_loop(small_net, shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    patch, sxy, sz = (32, 32, 16), 7, 5
    ref_label, ref_score = official_test_single_case(small_net, image, sxy, sz, patch, 2)
    label, score = sliding_window_predict(small_net, image, patch, sxy, sz, num_classes=2, window_batch=4)
    assert label.dtype == np.uint8 and label.shape == shape
    assert score.dtype == np.float32 and score.shape == (2,) + shape
    np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(label, ref_label)
    label1, score1 = sliding_window_predict(small_net, image, patch, sxy, sz, num_classes=2, window_batch=1)
    # Same windows, same accumulation order; only the batched convolutions may round differently (1 ulp).
    np.testing.assert_allclose(score1, score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(label1, label)


class _ConstantLogits(torch.nn.Module):
    """Logits that depend only on the voxel's x index: class scores tie at even x, class 2 wins at odd x."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))   # a parameter, so the device check has one to read

    def forward(self, x):
        b, _, X, Y, Z = x.shape
        odd = (torch.arange(X) % 2).float().view(1, X, 1, 1).expand(b, X, Y, Z)
        return torch.stack([torch.zeros_like(odd), torch.zeros_like(odd), odd], dim=1) + 0 * self.w


def test_channels_last_default_is_on_where_measured_faster():
    from utils.inference import channels_last_default
    assert channels_last_default("cpu") and channels_last_default(torch.device("cuda", 1))
    assert not channels_last_default("mps") and not channels_last_default("meta")


def test_softmax_with_float32_dtype_equals_softmax_of_float_logits():
    """sliding_window_predict takes the softmax of bf16 logits with dtype=float32 (no float32 copy first)."""
    torch.manual_seed(4)
    logits = (3 * torch.randn(3, 2, 8, 6, 4)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(torch.softmax(logits, dim=1, dtype=torch.float32), torch.softmax(logits.float(), dim=1))


def test_memory_format_restrides_one_channel_weights_and_restores_them():
    """A (F, 1, 3, 3, 3) weight passes is_contiguous() for both layouts; inside the context it must still get
    channels_last strides (oneDNN chose a slower V-Net forward otherwise), and its own strides back after."""
    net = VNet(n_channels=1, n_classes=2, n_filters=4)
    first, second = net.block_one.conv[0].weight, net.block_two.conv[0].weight
    assert first.is_contiguous(memory_format=torch.channels_last_3d) and first.stride() == (27, 27, 9, 3, 1)
    cl_second = second.detach().to(memory_format=torch.channels_last_3d).stride()
    value = first.detach().clone()
    with _memory_format(net, True) as fmt:
        assert fmt == torch.channels_last_3d
        assert first.stride() == canonical_strides(first.shape, fmt) == (27, 1, 9, 3, 1)
        assert second.stride() == cl_second
        inside = first
    assert inside is first and first.stride() == (27, 27, 9, 3, 1) and second.is_contiguous()
    assert torch.equal(first, value)
    # contiguous requested: an already contiguous net is left as it is
    with _memory_format(net, False):
        assert first.stride() == (27, 27, 9, 3, 1)
    # a channels_last net asked for contiguous gets contiguous strides inside and its own back after
    net = net.to(memory_format=torch.channels_last_3d)
    first = net.block_one.conv[0].weight
    with _memory_format(net, False):
        assert first.stride() == (27, 27, 9, 3, 1) and net.block_two.conv[0].weight.is_contiguous()
    assert first.stride() == (27, 1, 9, 3, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_relu_copy_matches_autocast(small_net, channels_last):
    # what sliding_window_predict runs on CPU: the folded copy, converted to the autocast dtype, with every
    # conv + ReLU as one oneDNN call; it must compute what autocast on the folded copy computes. oneDNN may pick
    # another kernel for the fused op (on the project's CPU: identical at 112x112x80 windows, 1-2 ulp apart at
    # 32x32x16), so the comparison allows float rounding: 1e-6 in fp32, one bf16 step in bf16.
    assert can_fuse_conv_relu()          # the pinned CPU wheel has oneDNN's fused ops
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=fmt)
    folded = fold_batchnorm(small_net).to(memory_format=fmt)
    with torch.inference_mode():
        fused32 = fuse_conv_relu(fold_batchnorm(small_net).to(memory_format=fmt))
        torch.testing.assert_close(fused32(x), folded(x), rtol=0, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = folded(x)
        fused16 = fuse_conv_relu(fold_batchnorm(small_net).to(torch.bfloat16).to(memory_format=fmt))
        if native_cpu_bf16():
            out16 = fused16(x.to(torch.bfloat16))
            assert out16.dtype == ref.dtype == torch.bfloat16
            torch.testing.assert_close(out16.float(), ref.float(), rtol=2 ** -7,
                                       atol=2 ** -7 * ref.float().abs().max())
        else:
            # a CPU without native bfloat16 (e.g. AVX2 only): oneDNN refuses the fused bf16 op, which is why
            # sliding_window_predict does not use it there (test_bf16_inference_without_native_bf16)
            with pytest.raises(RuntimeError, match="bf16"):
                fused16(x.to(torch.bfloat16))
    n_fused = sum(type(m).__name__ == "_ConvReLU" for m in fused32.modules())
    assert n_fused == sum(isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) for m in small_net.modules()) - 1
    assert not any(isinstance(m, torch.nn.ReLU) for m in fused32.modules())   # only out_conv stays unfused


@pytest.mark.parametrize("normalization", ["none", "groupnorm", "instancenorm"])
def test_fused_conv_relu_leaves_other_norms_alone(normalization):
    # only a conv directly followed by a ReLU (or by a folded BatchNorm's Identity and a ReLU) is fused
    torch.manual_seed(4)
    net = fold_batchnorm(VNet(n_filters=16, normalization=normalization).eval())
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.inference_mode():
        ref = net(x)
        fused = fuse_conv_relu(net)
        n_fused = sum(type(m).__name__ == "_ConvReLU" for m in fused.modules())
        assert n_fused == (29 if normalization == "none" else 0)   # 21 block convs + 4 down + 4 up
        torch.testing.assert_close(fused(x), ref, rtol=0, atol=1e-6)


def test_label_map_takes_the_first_class_on_ties_like_argmax():
    image = np.zeros((20, 18, 10), np.float32)
    label, score = sliding_window_predict(_ConstantLogits(), image, (16, 16, 8), 4, 2, num_classes=3)
    np.testing.assert_array_equal(label, np.argmax(score, axis=0))
    assert (label[0::2] == 0).all() and (label[1::2] == 2).all()


def test_the_bf16_probe_tells_whether_the_fused_bf16_kernels_run(monkeypatch):
    # the probe's answer (unforced) must be what oneDNN does on this CPU
    monkeypatch.delenv(bf16.FORCE_ENV, raising=False)
    conv = fuse_conv_relu(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).bfloat16())
    try:
        conv(torch.ones(1, 1, 4, 4, 4, dtype=torch.bfloat16))
        runs = True
    except RuntimeError:
        runs = False
    assert native_cpu_bf16() == runs


@pytest.mark.parametrize("forced_off", [False, True])
def test_bf16_inference_without_native_bf16(small_net, monkeypatch, forced_off):
    # where the CPU has no native bfloat16 (forced here: SEMISAM_CPU_BF16=0, or a real AVX2-only CPU), bf16
    # inference must run the plain autocast computation, never the fused oneDNN ops, and give the same scores
    # as autocast on the folded copy; with native bf16 the fused path gives them up to bf16 rounding
    if forced_off:
        monkeypatch.setenv(bf16.FORCE_ENV, "0")
    else:
        monkeypatch.delenv(bf16.FORCE_ENV, raising=False)
    native = native_cpu_bf16()
    assert native == (False if forced_off else bf16._probe())
    if not native:
        def refuse(net):
            raise AssertionError("fused oneDNN ops used without native bf16")
        monkeypatch.setattr(inference_module, "fuse_conv_relu", refuse)
    image = np.random.default_rng(2).normal(size=(40, 36, 20)).astype(np.float32)
    label, score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, amp_dtype=torch.bfloat16)
    _, ref = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, amp_dtype=torch.bfloat16, fold_bn=False)
    assert score.dtype == np.float32 and label.shape == image.shape
    np.testing.assert_allclose(score, ref, rtol=0, atol=0.02)
    np.testing.assert_allclose(score.sum(0), 1.0, atol=1e-5)


def test_sliding_window_modes_devices_and_amp(small_net):
    image = np.random.default_rng(1).normal(size=(40, 36, 20)).astype(np.float32)
    small_net.train()
    ref_label, ref_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4)
    assert small_net.training  # the caller's mode is restored
    small_net.eval()
    _, eval_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4)
    np.testing.assert_array_equal(eval_score, ref_score)  # ran in eval mode anyway
    _, bf16_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, amp_dtype=torch.bfloat16)
    assert bf16_score.dtype == np.float32
    np.testing.assert_allclose(bf16_score.sum(0), 1.0, atol=1e-5)  # float32 softmax averaging
    assert np.abs(bf16_score - ref_score).max() < 0.1
    # layout: channels_last_3d (the CPU default) and contiguous agree; the net's weights keep their layout
    weight = small_net.block_two.conv[0].weight
    assert weight.is_contiguous()
    _, contiguous_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, channels_last=False)
    _, cl_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, channels_last=True)
    np.testing.assert_allclose(cl_score, contiguous_score, rtol=0, atol=1e-5)
    assert small_net.block_two.conv[0].weight.is_contiguous()
    # a timer sees every part of the call, once per batch of windows for the loop parts, and changes nothing
    timer = SectionTimer()
    _, timed_score = sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, timer=timer)
    np.testing.assert_array_equal(timed_score, cl_score)
    batches = math.ceil(len(list(itertools.product(*(window_starts(s, p, st) for s, p, st in zip(
        [max(s, p) for s, p in zip(image.shape, (32, 32, 16))], (32, 32, 16), (8, 8, 4)))))) / 4)
    assert timer.counts == {"prepare": 1, "windows": batches, "forward": batches, "accumulate": batches, "finish": 1}
    with pytest.raises(ValueError, match="net.to"):
        sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, device="meta")
    with pytest.raises(ValueError, match="outputs 2 classes but num_classes=3"):
        sliding_window_predict(small_net, image, (32, 32, 16), 8, 4, num_classes=3)
    with pytest.raises(ValueError, match="3-D"):
        sliding_window_predict(small_net, image[0], (32, 32, 16), 8, 4)


@pytest.mark.parametrize("normalization", ["batchnorm", "groupnorm", "none"])
def test_batchnorm_folding_keeps_the_outputs(small_net, normalization):
    torch.manual_seed(5)
    net = small_net if normalization == "batchnorm" else VNet(n_filters=16 if normalization == "groupnorm" else 4,
                                                              normalization=normalization).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    folded = fold_batchnorm(net)
    kinds = {type(m) for m in folded.modules()}
    assert torch.nn.BatchNorm3d not in kinds and not folded.training
    if normalization == "batchnorm":  # convolutions and transposed convolutions were both folded
        assert isinstance(folded.block_five_up.conv[1], torch.nn.Identity)
        assert isinstance(folded.block_one.conv[1], torch.nn.Identity)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == (normalization == "batchnorm")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    if normalization == "groupnorm":
        assert any(isinstance(m, torch.nn.GroupNorm) for m in folded.modules())


def test_window_starts_official_formula():
    assert window_starts(190, 112, 18) == [0, 18, 36, 54, 72, 78]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(112, 112, 18) == [0]


def test_largest_connected_component_is_26_connected_and_safe_on_empty():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:3, 1:3, 1:3] = 1                    # 8 voxels
    mask[3, 3, 3] = 1                          # touches the cube only at a corner: same 26-component
    mask[6:9, 6:9, 6:8] = 1                    # 18 voxels: the largest
    out = largest_connected_component(mask)
    assert out.dtype == np.uint8
    assert out.sum() == 18 and out[6:9, 6:9, 6:8].all()
    mask[0, 0, 0:6] = 1                        # joins the corner group: 8 + 1 + 6 = 15 < 18, still loses
    mask[7:10, 0:2, 7:10] = 1                  # another 18 voxels: a tie, won by the one met first in C order
    x, y, _ = np.indices(mask.shape)
    np.testing.assert_array_equal(largest_connected_component(mask) != 0, (mask != 0) & (x >= 6) & (y >= 6))
    chain = np.zeros((6, 6, 6), np.uint8)
    for i in range(6):
        chain[i, i, i] = 1                     # diagonal chain: one component only with full connectivity
    chain[0, 5, 0] = 1
    assert largest_connected_component(chain).sum() == 6
    empty = np.zeros((4, 4, 4), np.uint8)
    np.testing.assert_array_equal(largest_connected_component(empty), empty)


# ------------------------------------------------------------------------------------ test_LA.py, real data

FAST = ["--patch_size", "64", "64", "48", "--stride_xy", "64", "--stride_z", "48", "--device", "cpu",
        "--window_batch", "4"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(5)
    net = VNet(n_filters=4, normalization="batchnorm", has_dropout=True)
    sd = net.state_dict()
    plain = folder / "iter_6000.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, plain)  # DataParallel-style prefix
    state = folder / "train_state.pth"
    torch.save({"format": "semisam_train_state", "version": 1, "iteration": 6000, "student": sd,
                "teacher": {k: v.clone() for k, v in sd.items()}, "config": {"vnet": net.config,
                                                                            "patch_size": [112, 112, 80]}}, state)
    return dict(plain=plain, state=state, folder=folder, sd=sd)


@pytest.fixture(scope="module")
def post_run(la_data_dir, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("post")
    summary = test_LA.main(["--root_path", str(la_data_dir), "--model_path", str(checkpoints["plain"]),
                            "--max_cases", "2", "--out_dir", str(out)] + FAST)
    return out, summary


def test_main_writes_table_csv_json_and_nifti(post_run, la_data_dir, la_root):
    out, summary = post_run
    cases = (la_root / "test.list").read_text().split()[:2]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases
    assert set(rows[0]) == {"case", "dice", "jaccard", "hd95_mm", "asd_mm", "seconds"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["distance_unit"] == "mm" and saved["n_cases"] == 2 and saved["post_process"] is True
    assert saved["vnet"]["n_filters"] == 4 and saved["vnet"]["normalization"] == "batchnorm"
    for metric in ("dice", "jaccard", "hd95", "asd"):
        values = [float(r[metric if metric in ("dice", "jaccard") else f"{metric}_mm"]) for r in rows]
        assert saved["mean"][metric] == pytest.approx(np.mean(values), rel=1e-12)
        assert saved["std"][metric] == pytest.approx(np.std(values), rel=1e-12, abs=1e-12)
    for row in rows:
        case = row["case"]
        pred_img = nib.load(out / f"{case}_pred.nii.gz")
        np.testing.assert_allclose(np.diag(pred_img.affine), [0.625, 0.625, 0.625, 1.0])
        pred = np.asarray(pred_img.dataobj)
        gt = np.asarray(nib.load(out / f"{case}_gt.nii.gz").dataobj)
        image, label = load_case(la_data_dir, case)
        np.testing.assert_array_equal(gt, label)
        np.testing.assert_array_equal(np.asarray(nib.load(out / f"{case}_img.nii.gz").dataobj), image)
        assert np.array_equal(largest_connected_component(pred), pred)  # post-processed
        expected = calculate_metric_percase(pred, gt, spacing=0.625)
        np.testing.assert_allclose([float(row[k]) for k in ("dice", "jaccard", "hd95_mm", "asd_mm")], expected,
                                   rtol=1e-12)


def test_main_prints_per_case_table_with_units(post_run, capsys, la_data_dir, checkpoints, tmp_path):
    test_LA.main(["--root_path", str(la_data_dir), "--model_path", str(checkpoints["state"]), "--max_cases", "1",
                  "--out_dir", str(tmp_path), "--no_save_nii", "--spacing", "none"] + FAST)
    text = capsys.readouterr().out
    assert "HD95 voxels" in text and "ASD voxels" in text and "mean ± std" in text
    # training-state file, same student weights: same segmentation; distances now in voxels
    first_mm = post_run[1]["cases"][0]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["distance_unit"] == "voxels" and saved["spacing"] is None
    case = saved["cases"][0]
    assert case["case"] in text
    assert case["dice"] == first_mm["dice"]
    assert case["hd95"] == pytest.approx(first_mm["hd95"] / 0.625, rel=1e-9)
    assert case["asd"] == pytest.approx(first_mm["asd"] / 0.625, rel=1e-9)
    assert not list(tmp_path.glob("*.nii.gz"))


def test_no_post_changes_only_the_post_processing(post_run, la_data_dir, checkpoints, tmp_path):
    out_post, _ = post_run
    test_LA.main(["--root_path", str(la_data_dir), "--model_path", str(checkpoints["plain"]), "--max_cases", "1",
                  "--out_dir", str(tmp_path), "--no_post"] + FAST)
    case = json.loads((tmp_path / "summary.json").read_text())["cases"][0]["case"]
    raw = np.asarray(nib.load(tmp_path / f"{case}_pred.nii.gz").dataobj)
    post = np.asarray(nib.load(out_post / f"{case}_pred.nii.gz").dataobj)
    np.testing.assert_array_equal(largest_connected_component(raw), post)
    assert raw.sum() >= post.sum()


def test_checkpoint_errors_list_keys_and_name_files(la_data_dir, checkpoints, tmp_path):
    sd = dict(checkpoints["sd"])
    sd["block_ten.conv.0.weight"] = torch.zeros(1)
    del sd["block_nine.conv.0.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    args = ["--root_path", str(la_data_dir), "--max_cases", "1", "--out_dir", str(tmp_path)] + FAST
    with pytest.raises(CheckpointError, match=r"1 missing keys: block_nine.conv.0.bias; "
                                              r"1 unexpected keys: block_ten.conv.0.weight"):
        test_LA.main(args + ["--model_path", str(bad)])
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        test_LA.main(args + ["--model_path", str(tmp_path / "nowhere.pth")])
    torch.save({"state_dict": checkpoints["sd"]}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="missing key 'block_one.conv.0.weight'.*state_dict"):
        load_specialist(tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError,
                       match=r"keys with wrong shapes: block_one.conv.0.weight \[4, 1, 3, 3, 3\] \(model \[8, 1, 3, "):
        load_specialist(checkpoints["plain"], n_filters=8)
    torch.save({"args": argparse.Namespace(lr=0.01), "w": torch.zeros(1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="pickled.pth.*weights_only=True"):
        load_specialist(tmp_path / "pickled.pth")
    torch.save({"format": "semisam_train_state", "student": checkpoints["sd"],
                "config": {"vnet": {"n_filters": 4, "depth": 5}}}, tmp_path / "odd_state.pth")
    with pytest.raises(CheckpointError, match="odd_state.pth: cannot build VNet.*depth"):
        load_specialist(tmp_path / "odd_state.pth")
    net, config = load_specialist(checkpoints["state"], normalization="batchnorm")
    assert config == dict(n_channels=1, n_classes=2, n_filters=4, normalization="batchnorm", has_dropout=True)
    assert not net.training


def test_paths_and_argument_defaults(tmp_path):
    args = test_LA.parse_args(["--exp", "LA/x", "--iteration", "best", "--root_path", str(tmp_path / "data" / "r")])
    ckpt, test_list, out_dir = test_LA.resolve_paths(args)
    assert ckpt.as_posix() == "../model/LA/x/best_model.pth"
    assert test_list == tmp_path / "data" / "r" / ".." / "test.list"
    assert out_dir.as_posix() == "../model/prediction/LA/x_post"
    args = test_LA.parse_args(["--iteration", "3000", "--patch_size", "128", "128", "128"])
    assert test_LA.resolve_paths(args)[0].as_posix() == "../model/LA/SemiSAM_MT/iter_3000.pth"   # the script's EXP
    assert args.spacing == (0.625, 0.625, 0.625) and args.post_process and args.save_nii
    assert args.patch_size == [128, 128, 128] and (args.stride_xy, args.stride_z) == (18, 4)
    assert test_LA.parse_args(["--spacing", "0"]).spacing is None
    np.testing.assert_array_equal(test_LA.nifti_affine((0.5, 1.0, 2.0)), np.diag([0.5, 1.0, 2.0, 1.0]))
    for bad in (["--spacing", "1", "2"], ["--patch_size", "64", "64", "40"], ["--stride_z", "0"]):
        with pytest.raises(SystemExit):
            test_LA.parse_args(bad)


def test_window_defaults_to_the_training_patch_beside_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "run" / "iter_300.pth"
    ckpt.parent.mkdir()
    assert test_LA.parse_args([]).patch_size is None
    assert test_LA.window_for(ckpt, None) == [112, 112, 80]                 # no config.json: UA-MT's window
    assert "no config.json" in capsys.readouterr().out
    (ckpt.parent / "config.json").write_text(json.dumps({"patch_size": [64, 64, 48], "exp": "demo"}))
    assert test_LA.window_for(ckpt, None) == [64, 64, 48]
    assert "the training patch" in capsys.readouterr().out
    assert test_LA.window_for(ckpt, [112, 112, 80]) == [112, 112, 80]       # a flag still overrides, with a note
    assert "note: --patch_size (112, 112, 80) differs from the training patch (64, 64, 48)" in capsys.readouterr().out
    (ckpt.parent / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        test_LA.window_for(ckpt, None)
