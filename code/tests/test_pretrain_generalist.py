"""Generalist (pre)training: shape corpus, SAM-Med3D click recipe, checkpoint format, resume, fine-tuning."""
import json

import numpy as np
import pytest
import torch

import pretrain_generalist
from dataloaders.layout import TRAINING_FOLDER
from dataloaders.phantoms import write_phantom_dataset
from dataloaders.shape_corpus import (MIN_THICKNESS, OBJECT_KINDS, ShapeCorpus, ShapeCorpusError, _object_mask,
                                      corpus_rng, sample, sample_scene, sample_targets)
from networks.sam_med3d import build_sam3d_from_config, clear_generalist_cache, load_generalist, sam3d_config
from training.pretrain import (CKPT_FORMAT, H5Crops, PretrainConfig, PretrainError, build_model, config_json_path,
                               interaction_loss, lr_at, pretrain, simulate_padding)

# the architecture of golden fixture a (img 32, patch 8, 4^3 token grid, 16^3 mask prompt)
TINY = {
    "image_encoder": {"img_size": 32, "patch_size": 8, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
                      "mlp_ratio": 4.0, "out_chans": 48, "qkv_bias": True,
                      "norm_layer": {"type": "LayerNorm", "eps": 1e-06}, "act_layer": "GELU", "use_abs_pos": True,
                      "use_rel_pos": True, "rel_pos_zero_init": True, "window_size": 6, "global_attn_indexes": [1]},
    "prompt_encoder": {"embed_dim": 48, "image_embedding_size": [4, 4, 4], "input_image_size": [32, 32, 32],
                       "mask_in_chans": 8, "activation": "GELU"},
    "mask_decoder": {"transformer_dim": 48, "num_multimask_outputs": 3, "iou_head_depth": 3,
                     "iou_head_hidden_dim": 16, "activation": "GELU"},
}


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def tiny_cfg(tmp, tiny_json, **kw) -> PretrainConfig:
    args = dict(out=str(tmp / "gen.pth"), arch_config=str(tiny_json), iterations=8, batch_size=2, lr=8e-4,
                warmup=4, seed=0, num_clicks=3, log_every=4, save_every=1000, progress=False)
    args.update(kw)
    return PretrainConfig(**args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_json):
    """A 40-iteration corpus pretraining run of the tiny architecture."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(tmp, tiny_json, iterations=40)
    return cfg, pretrain(cfg)


# ----------------------------------------------------------------------------------------------- shape corpus

def test_corpus_is_deterministic_and_varied():
    a_img, a_mask = sample(corpus_rng(3, 7), 32)
    b_img, b_mask = sample(corpus_rng(3, 7), 32)
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    c_img, _ = sample(corpus_rng(3, 8), 32)
    d_img, _ = sample(corpus_rng(4, 7), 32)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)
    ds = ShapeCorpus(32, seed=3)
    assert torch.equal(ds[7]["image"], torch.from_numpy(a_img)) and torch.equal(ds[7]["label"],
                                                                                 torch.from_numpy(a_mask))


def test_corpus_samples_are_normalised_single_object_targets():
    seen_kinds, checked = set(), 0
    for i in range(12):
        image, mask = sample(corpus_rng(0, i), 32)
        assert image.shape == (1, 32, 32, 32) and image.dtype == np.float32
        assert mask.shape == (32, 32, 32) and mask.dtype == np.uint8
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-4
        assert mask.sum() >= 20
        # the target is exactly one instance of the scene drawn from the same generator state
        img2, instances, kinds = sample_scene(corpus_rng(0, i), 32)
        if np.array_equal(img2, image[0]):
            ids = np.unique(instances[mask > 0])
            assert ids.size == 1 and ids[0] > 0
            assert np.array_equal(instances == ids[0], mask > 0)
            checked += 1
        seen_kinds.update(kinds)
    assert checked >= 10  # scenes are redrawn only when no object is large enough
    assert seen_kinds == set(OBJECT_KINDS)


def test_corpus_rejects_bad_sizes():
    with pytest.raises(ShapeCorpusError, match="img_size must be an integer >= 16"):
        sample(corpus_rng(0, 0), 8)
    with pytest.raises(IndexError, match="out of range"):
        ShapeCorpus(32, length=3)[3]


# ----------------------------------------------------------------------------------------------- training

def test_loss_decreases(trained):
    _, result = trained
    losses = np.array(result["losses"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    first, last = losses[:10], losses[-10:]
    # robust: the drop must exceed 3 standard errors of the difference of the two window means
    std_err = np.sqrt(first.var(ddof=1) / first.size + last.var(ddof=1) / last.size)
    assert first.mean() - last.mean() > 3 * std_err, (first.mean(), last.mean(), std_err)


def test_checkpoint_format_and_load_generalist(trained, tiny_json):
    cfg, result = trained
    out = result["out"]
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == CKPT_FORMAT and ckpt["iteration"] == 40 and ckpt["epoch"] == 40
    assert set(ckpt) >= {"model_state_dict", "optimizer_state_dict", "config", "train_args", "losses"}
    assert ckpt["optimizer_state_dict"]["state"], "optimizer state must be saved"
    json_path = config_json_path(out)
    assert json_path == out.with_suffix(".json")
    assert json.loads(json_path.read_text()) == ckpt["config"] == TINY
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]

    clear_generalist_cache()
    model = load_generalist(out, arch=str(json_path))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    loaded = model.state_dict()
    assert loaded.keys() == ckpt["model_state_dict"].keys()
    assert all(torch.equal(loaded[k], ckpt["model_state_dict"][k]) for k in loaded)
    fresh = build_sam3d_from_config(TINY).state_dict()
    changed = [k for k in loaded if not torch.equal(loaded[k], fresh[k])]
    assert len(changed) > len(loaded) // 2  # trained weights, not a fresh model


def test_resume_is_bit_identical(tmp_path, tiny_json):
    full = pretrain(tiny_cfg(tmp_path / "full", tiny_json))
    part_cfg = tiny_cfg(tmp_path / "part", tiny_json, stop_at=4)
    half = pretrain(part_cfg)
    assert half["iteration"] == 4
    mid = torch.load(half["out"], map_location="cpu", weights_only=True)
    assert mid["iteration"] == 4
    resumed = pretrain(tiny_cfg(tmp_path / "part", tiny_json, resume=str(half["out"])))
    assert resumed["iteration"] == 8
    assert resumed["losses"] == full["losses"]
    a = torch.load(full["out"], map_location="cpu", weights_only=True)
    b = torch.load(resumed["out"], map_location="cpu", weights_only=True)
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    for pid, state in a["optimizer_state_dict"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer_state_dict"]["state"][pid][key])

    with pytest.raises(PretrainError, match="seed: checkpoint 0 vs now 1"):
        pretrain(tiny_cfg(tmp_path / "part", tiny_json, resume=str(half["out"]), seed=1, iterations=9))
    with pytest.raises(PretrainError, match="nothing left to do"):
        pretrain(tiny_cfg(tmp_path / "part", tiny_json, resume=str(resumed["out"])))


def test_finetune_on_phantom_h5_collection_via_cli(tmp_path, trained, tiny_json, capsys):
    _, result = trained
    data = tmp_path / "ph"
    write_phantom_dataset(data, n_train=2, n_test=1, size=(40, 36, 28), seed=0)  # Z < 32: crops get padded
    out = tmp_path / "ft.pth"
    rc = pretrain_generalist.main([
        "--init", str(result["out"]), "--arch_config", str(tiny_json), "--data", str(data / TRAINING_FOLDER),
        "--iterations", "2", "--batch_size", "2", "--num_clicks", "2", "--out", str(out), "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    init = torch.load(result["out"], map_location="cpu", weights_only=True)["model_state_dict"]
    assert ckpt["iteration"] == 2 and ckpt["train_args"]["init"] == str(result["out"])
    assert len(ckpt["losses"]) == 2
    diffs = [float((ckpt["model_state_dict"][k] - v).abs().max()) for k, v in init.items()]
    assert 0 < max(diffs) < 0.1  # started from the init weights and moved a little


def test_h5_crops_contain_foreground_and_are_deterministic(tmp_path):
    write_phantom_dataset(tmp_path, n_train=2, n_test=1, size=(40, 36, 28), seed=1)
    base = tmp_path / TRAINING_FOLDER
    crops = H5Crops(base, ["PHANTOM_000", "PHANTOM_001"], img_size=32, seed=4, fg_prob=1.0)
    for i in range(6):
        item = crops[i]
        assert tuple(item["image"].shape) == (1, 32, 32, 32) and tuple(item["label"].shape) == (32, 32, 32)
        assert item["label"].sum() > 0
    again = H5Crops(base, ["PHANTOM_000", "PHANTOM_001"], img_size=32, seed=4, fg_prob=1.0)
    assert torch.equal(again[5]["image"], crops[5]["image"])
    # the 28-voxel Z axis is padded to 32 with the volume's minimum and label 0
    image = crops[0]["image"][0]
    assert torch.all(image[:, :, :2] == image.min()) and torch.all(crops[0]["label"][:, :, :2] == 0)


def test_tubes_and_shells_are_thick_enough_for_the_generalists_output_grid():
    from scipy import ndimage
    size = 64
    for kind, least in (("tube", 0.8 * MIN_THICKNESS * size), ("shell", 0.4 * MIN_THICKNESS * size)):
        depths = []
        for i in range(12):
            mask = _object_mask(corpus_rng(11, i), kind, size)
            if mask.sum() >= 20:
                depths.append(ndimage.distance_transform_edt(mask).max())
        # radius of a tube, half the wall of a shell; the first corpus had tubes of radius 1.2 at S = 64
        assert len(depths) >= 8 and min(depths) >= least, (kind, depths)


def test_several_targets_per_scene_are_distinct_objects_of_one_image():
    image1, mask1 = sample(corpus_rng(2, 5), 32)
    image, masks = sample_targets(corpus_rng(2, 5), 32, 3)
    assert masks.shape == (3, 32, 32, 32) and masks.dtype == np.uint8
    assert np.array_equal(image, image1) and np.array_equal(masks[0], mask1)   # the same draws as sample()
    distinct = 0
    for i in range(6):
        _, masks = sample_targets(corpus_rng(0, i), 32, 2)
        assert masks.reshape(2, -1).sum(1).min() >= 20
        distinct += int(not (masks[0] & masks[1]).any())   # different instances never overlap
    assert distinct >= 4
    item = ShapeCorpus(32, seed=2, targets=3)[5]
    assert tuple(item["label"].shape) == (3, 32, 32, 32)
    assert tuple(ShapeCorpus(32, seed=2)[5]["label"].shape) == (32, 32, 32)
    with pytest.raises(ShapeCorpusError, match="targets must be an integer >= 1, got 0"):
        ShapeCorpus(32, targets=0)


def test_several_targets_share_one_image_encoding(tiny_json):
    model = build_model(json.loads(tiny_json.read_text()), seed=0)
    images = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.zeros(2, 32, 32, 32, dtype=torch.bool)
    target[0, 8:20, 8:20, 8:20] = True
    target[1, 14:28, 4:16, 10:22] = True
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))

    def loss_of(targets):
        # one click at the deepest point (no random draw) and a zero mask prompt: deterministic
        return interaction_loss(model, images, targets, 1, torch.Generator().manual_seed(0),
                                np.random.default_rng(0), no_mask_prob=0.0)

    single, _ = loss_of(target)
    single = single.detach()
    repeated, info = loss_of(target[:, None].expand(2, 3, 32, 32, 32))
    repeated = repeated.detach()
    hook.remove()
    assert calls == [1, 1]                       # the image is encoded once per batch, whatever K
    assert repeated.item() == pytest.approx(single.item(), rel=1e-5)   # K copies of a target: the same mean loss
    assert len(info["step_losses"]) == 1
    padded_i, padded_t = simulate_padding(images, target[:, None].expand(2, 3, 32, 32, 32).clone(),
                                          np.random.default_rng(0), prob=1.0)
    assert padded_t.shape == (2, 3, 32, 32, 32) and torch.equal(padded_t[:, 0], padded_t[:, 2])
    assert bool((padded_i != images).any())


def test_simulate_padding_mimics_the_pad_geometry():
    images = torch.randn(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    original = images.clone()
    targets = torch.zeros(3, 32, 32, 32, dtype=torch.bool)
    targets[:, 12:20, 12:20, 12:20] = True   # centred: survives any kept box
    targets[2] = False
    targets[2, :3, :3, :3] = True            # a corner object that padding would erase: sample left whole
    same_i, same_t = simulate_padding(images, targets, np.random.default_rng(0), prob=0.0)
    assert torch.equal(same_i, images) and torch.equal(same_t, targets)
    padded_i, padded_t = simulate_padding(images, targets, np.random.default_rng(0), prob=1.0)
    assert torch.equal(images, original)
    for b in range(2):
        kept = padded_i[b, 0] == images[b, 0]
        idx = kept.nonzero()
        lo, extent = idx.min(0).values, idx.max(0).values - idx.min(0).values + 1
        assert int(kept.sum()) == int(extent.prod()) < 32 ** 3          # one box ...
        assert torch.equal(lo, (32 - extent) // 2) and bool((extent >= 16).all())  # ... centred, >= S/2
        assert torch.all(padded_i[b, 0][~kept] == images[b, 0][kept].min())  # darkest value of the patch
        assert torch.equal(padded_t[b], targets[b])
    assert torch.equal(padded_i[2], images[2]) and torch.equal(padded_t[2], targets[2])


def test_lr_schedules():
    cfg = PretrainConfig(iterations=100, warmup=10, lr=1.0)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 99) < 0.01
    step = PretrainConfig(iterations=100, warmup=0, lr=1.0, lr_schedule="step")
    assert [lr_at(step, t) for t in (59, 60, 90)] == pytest.approx([1.0, 0.1, 0.01])


def test_bad_settings_name_the_flag_or_file(tmp_path, tiny_json):
    with pytest.raises(PretrainError, match="architecture config .*missing.json not found"):
        pretrain(tiny_cfg(tmp_path, tiny_json, arch_config=str(tmp_path / "missing.json")))
    with pytest.raises(PretrainError, match=r"--stop_at=9: expected an iteration in \[1, 8\]"):
        pretrain(tiny_cfg(tmp_path, tiny_json, stop_at=9))
    with pytest.raises(PretrainError, match="--resume .*nope.pth: checkpoint not found"):
        pretrain(tiny_cfg(tmp_path, tiny_json, resume=str(tmp_path / "nope.pth")))
    with pytest.raises(PretrainError, match="--data .*absent: folder not found"):
        pretrain(tiny_cfg(tmp_path, tiny_json, data=str(tmp_path / "absent")))
    with pytest.raises(PretrainError, match="--targets_per_image=2: expected 1 with --data"):
        pretrain(tiny_cfg(tmp_path, tiny_json, data=str(tmp_path), targets_per_image=2))
    with pytest.raises(KeyError, match="unknown SAM-Med3D registry name 'vit_nope'"):
        pretrain(tiny_cfg(tmp_path, tiny_json, arch_config=None, arch="vit_nope"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint_and_config(tmp_path, monkeypatch):
    from training.pretrain import save_checkpoint
    from utils import io
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    out = tmp_path / "g.pth"
    save_checkpoint(out, model, optimizer, 1, TINY, PretrainConfig(), [0.5])
    before = out.read_bytes(), config_json_path(out).read_text()

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("killed while writing")
    monkeypatch.setattr(io, "_serialize", dies)       # pretraining writes through utils.io (fsync, rename)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(out, model, optimizer, 2, TINY, PretrainConfig(), [0.5, 0.4])
    assert (out.read_bytes(), config_json_path(out).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.pth"]
    assert torch.load(out, weights_only=True)["iteration"] == 1


def test_demo_generalist_architecture_fits_the_shipping_limit():
    """vit_small_demo is what the shipped demo generalist is: at most 8 MB in float16, no zero-padded window."""
    cfg = sam3d_config("vit_small_demo")
    model = build_sam3d_from_config(cfg)
    assert 2 * sum(p.numel() for p in model.parameters()) <= 8e6
    enc = cfg["image_encoder"]
    assert enc["window_size"] == enc["img_size"] // enc["patch_size"] == 8
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 1, 64, 64, 64))
    assert tuple(emb.shape) == (1, 96, 8, 8, 8)


def test_keep_every_leaves_loadable_snapshots(tmp_path, tiny_json):
    from training.pretrain import snapshot_path
    cfg = tiny_cfg(tmp_path, tiny_json, iterations=4, keep_every=2)
    pretrain(cfg)
    final = torch.load(cfg.out, weights_only=True)
    for t in (2, 4):
        path = snapshot_path(cfg.out, t)
        assert path.name == f"gen_iter{t}.pth" and config_json_path(path).is_file()
        snap = torch.load(path, weights_only=True)
        assert snap["iteration"] == t and len(snap["losses"]) == t
    snap4 = torch.load(snapshot_path(cfg.out, 4), weights_only=True)
    assert all(torch.equal(snap4["model_state_dict"][k], v) for k, v in final["model_state_dict"].items())
    assert not snapshot_path(cfg.out, 1).exists() and not snapshot_path(cfg.out, 3).exists()
    load_generalist(snapshot_path(cfg.out, 2), arch=str(config_json_path(snapshot_path(cfg.out, 2))))
    with pytest.raises(PretrainError, match="keep_every"):
        pretrain(tiny_cfg(tmp_path, tiny_json, keep_every=-1))


def full_args(path) -> dict:
    return torch.load(path, weights_only=True)["train_args"]


def test_release_generalist_writes_the_official_float16_format_that_load_generalist_reads(trained, tmp_path):
    import release_model
    cfg, result = trained
    out = tmp_path / "released" / "demo_generalist.pth"
    info = release_model.main(["--generalist", "--model_path", str(result["out"]), "--out", str(out)])
    assert info["iteration"] == 40 and info["sha256"] == release_model.sha256(out)
    shipped = torch.load(out, weights_only=True)
    assert set(shipped) == {"model_state_dict", "iteration", "pretrain_args"} and shipped["iteration"] == 40
    assert shipped["pretrain_args"] == full_args(result["out"])
    assert all(v.dtype == torch.float16 for v in shipped["model_state_dict"].values() if v.is_floating_point())
    full = torch.load(result["out"], weights_only=True)
    assert out.stat().st_size < 0.6 * sum(v.numel() * 4 for v in full["model_state_dict"].values())
    assert json.loads(config_json_path(out).read_text()) == full["config"]
    clear_generalist_cache()
    model = load_generalist(out, arch=str(config_json_path(out)))
    for key, value in model.state_dict().items():   # float32 model holding the float16 values exactly
        assert value.dtype == torch.float32 and torch.equal(value, full["model_state_dict"][key].half().float()), key
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        release_model.main(["--generalist", "--model_path", str(result["out"]), "--out", str(out)])
    with pytest.raises(Exception, match="not a 'semisam_generalist_pretrain' checkpoint"):
        release_model.main(["--generalist", "--model_path", str(out), "--out", str(tmp_path / "again.pth")])
