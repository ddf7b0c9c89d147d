"""Loading frozen SAM-Med3D generalists: checkpoint formats, arch selection, errors and the cache.

Checkpoints are written to tmp_path from a small config (img 24, ~0.6 M parameters) to keep files small.
"""
import argparse
import json
import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from networks.sam_med3d import (CKPT_DIR, GeneralistCheckpointError, arch_to_config, GeneralistCheckpointNotFoundError,
                                build_sam3d_from_config, clear_generalist_cache, load_generalist,
                                sam_model_registry3D)
from networks.sam_med3d import checkpoint as ckpt_module
from networks.sam_med3d.build import _make_config
from utils import io

REPO = Path(__file__).resolve().parents[2]


def small_config(name="small", **overrides):
    cfg = _make_config(name, img_size=24, patch_size=4, embed_dim=48, depth=3, num_heads=3, window_size=4,
                       global_attn_indexes=[2], prompt_dim=48, mask_in_chans=4, num_multimask_outputs=2,
                       iou_head_depth=2, iou_head_hidden_dim=24)
    cfg["image_encoder"].update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_generalist_cache()
    yield
    clear_generalist_cache()


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    model = build_sam3d_from_config(small_config())
    with torch.no_grad():  # non-zero rel_pos / pos_embed so a wrong mapping would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _write(path, obj):
    torch.save(obj, path)
    return path


def _checkpoint(model, fmt):
    sd = model.state_dict()
    if fmt == "raw":
        return sd
    if fmt == "model_state_dict":
        return {"model_state_dict": sd}
    if fmt == "sam_med3d_train_py":  # what SAM-Med3D's train.py save_checkpoint writes
        optimizer_state = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
                                     for i, p in enumerate(list(model.parameters())[:3])},
                           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1, 2]}]}
        return {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": optimizer_state,
                "lr_scheduler_state_dict": {"last_epoch": 3}, "losses": [0.5, 0.4], "dices": [0.6],
                "best_loss": 0.4, "best_dice": 0.6, "args": argparse.Namespace(lr=1e-4, model_type="vit_b_ori"),
                "used_datas": ["a", "b"]}
    prefixed = OrderedDict((f"module.{k}", v) for k, v in sd.items())
    if fmt == "ddp_module_prefix":
        return prefixed
    if fmt == "medim_state_dict_key":
        return {"state_dict": prefixed}
    raise AssertionError(fmt)


def _assert_same_weights(loaded, source):
    src = source.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(src)
    for k in src:
        assert torch.equal(got[k], src[k]), k


@pytest.mark.parametrize("fmt", ["raw", "model_state_dict", "sam_med3d_train_py", "ddp_module_prefix",
                                 "medim_state_dict_key"])
def test_every_checkpoint_format_loads_frozen(tmp_path, source_model, fmt, caplog):
    path = _write(tmp_path / f"{fmt}.pth", _checkpoint(source_model, fmt))
    with caplog.at_level(logging.WARNING, logger=io.log.name):   # the reader logs the unpickling warning
        model = load_generalist(path, arch=small_config())
    _assert_same_weights(model, source_model)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    masks, _ = model(torch.randn(1, 1, 24, 24, 24), points=(torch.tensor([[[3, 4, 5]]]), torch.tensor([[1]])))
    assert not masks.requires_grad and masks.shape == (1, 1, 24, 24, 24)
    pickled = fmt == "sam_med3d_train_py"
    warned = [r for r in caplog.records if "weights_only=False" in r.getMessage()]
    assert bool(warned) == pickled
    if pickled:
        assert str(path) in warned[0].getMessage() and "you named this file" in warned[0].getMessage()


def test_allow_pickle_false_refuses_non_tensor_checkpoints(tmp_path, source_model):
    path = _write(tmp_path / "full.pth", _checkpoint(source_model, "sam_med3d_train_py"))
    with pytest.raises(GeneralistCheckpointError, match="allow_pickle=False forbids") as err:
        load_generalist(path, arch=small_config(), allow_pickle=False)
    assert str(path) in str(err.value)
    # a weights-only file loads with allow_pickle=False
    ok = _write(tmp_path / "ok.pth", _checkpoint(source_model, "model_state_dict"))
    _assert_same_weights(load_generalist(ok, arch=small_config(), allow_pickle=False), source_model)


def test_arch_as_json_file_or_registry_name(tmp_path, source_model):
    path = _write(tmp_path / "m.pth", {"model_state_dict": source_model.state_dict()})
    cfg_path = tmp_path / "small.json"
    cfg_path.write_text(json.dumps(small_config()))
    _assert_same_weights(load_generalist(path, arch=str(cfg_path)), source_model)
    _assert_same_weights(load_generalist(path, arch=cfg_path), source_model)
    assert arch_to_config(cfg_path) == small_config() == arch_to_config(small_config())
    assert arch_to_config("vit_tiny_demo")["image_encoder"]["img_size"] == 64

    tiny = sam_model_registry3D["vit_tiny_demo"]()
    tiny_path = _write(tmp_path / "tiny.pth", {"model_state_dict": tiny.state_dict()})
    loaded = load_generalist(tiny_path, arch="vit_tiny_demo")
    _assert_same_weights(loaded, tiny)
    assert loaded.img_size == 64
    # the registry builders take a checkpoint too (official signature), not frozen
    built = sam_model_registry3D["vit_tiny_demo"](checkpoint=str(tiny_path))
    _assert_same_weights(built, tiny)
    assert built.prompt_encoder.no_mask_embed.weight.requires_grad

    with pytest.raises(GeneralistCheckpointError, match=r"'vit_h' is neither a registry name \(\['vit_b_ori', "):
        load_generalist(path, arch="vit_h")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(GeneralistCheckpointError, match="cannot read SAM-Med3D config JSON"):
        load_generalist(path, arch=bad_json)
    with pytest.raises(GeneralistCheckpointError, match="cannot build the SAM-Med3D architecture"):
        load_generalist(path, arch=small_config(window=3))


def test_bare_file_name_is_looked_up_in_repo_ckpt_folder(tmp_path, source_model, monkeypatch):
    assert CKPT_DIR == REPO / "ckpt"
    monkeypatch.setattr(ckpt_module, "CKPT_DIR", tmp_path)
    _write(tmp_path / "sam_med3d_small.pth", {"model_state_dict": source_model.state_dict()})
    monkeypatch.chdir(REPO)  # a relative name that does not exist in the working directory
    _assert_same_weights(load_generalist("sam_med3d_small.pth", arch=small_config()), source_model)


def test_missing_file_says_where_to_download_and_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_generalist(tmp_path / "nope" / "sam_med3d.pth")
    assert isinstance(err.value, GeneralistCheckpointError)
    msg = str(err.value)
    for needle in ("nope/sam_med3d.pth", "https://github.com/uni-medical/SAM-Med3D", "blueyo0/SAM-Med3D",
                   "sam_med3d_turbo.pth", "ckpt/", "ckpt/sam_med3d.pth"):
        assert needle in msg, needle
    with pytest.raises(GeneralistCheckpointNotFoundError, match=str(CKPT_DIR / "no_such_model.pth")):
        load_generalist("no_such_model.pth")


def test_wrong_keys_are_listed_with_counts_and_arch(tmp_path, source_model):
    sd = OrderedDict(source_model.state_dict())
    removed = list(sd)[:12]
    for k in removed:
        del sd[k]
    sd["extra.one"] = torch.zeros(1)
    sd["extra.two"] = torch.zeros(2)
    path = _write(tmp_path / "keys.pth", {"model_state_dict": sd})
    with pytest.raises(GeneralistCheckpointError) as err:
        load_generalist(path, arch=small_config("my_small_arch"))
    msg = str(err.value)
    assert "12 missing keys: image_encoder.pos_embed, " in msg and "(2 more)" in msg
    assert removed[9] in msg and removed[10] not in msg        # only the first 10 listed
    assert "2 unexpected keys: extra.one, extra.two" in msg
    assert "my_small_arch" in msg and str(path) in msg


def test_wrong_shapes_are_listed(tmp_path, source_model):
    path = _write(tmp_path / "shapes.pth", source_model.state_dict())
    narrower = small_config("narrower", mlp_ratio=2.0)
    with pytest.raises(GeneralistCheckpointError) as err:
        load_generalist(path, arch=narrower)
    msg = str(err.value)
    # lin1.weight, lin1.bias and lin2.weight of each of the 3 blocks
    assert "9 keys with wrong shapes: image_encoder.blocks.0.mlp.lin1.weight [192, 48] (model [96, 48])" in msg
    assert "missing keys" not in msg and "'narrower'" in msg
    with pytest.raises(GeneralistCheckpointError, match=r"architecture registry entry 'vit_tiny_demo'"):
        load_generalist(path, arch="vit_tiny_demo")


def test_unreadable_or_foreign_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(GeneralistCheckpointError, match="cannot read generalist checkpoint .*junk.pth"):
        load_generalist(junk, arch=small_config())
    other = _write(tmp_path / "other.pth", {"weights": {"a": 1}, "note": "x"})
    with pytest.raises(GeneralistCheckpointError, match=r"top-level keys: \['weights', 'note'\]"):
        load_generalist(other, arch=small_config())


def test_cache_returns_the_same_model_object(tmp_path, source_model):
    path = _write(tmp_path / "c.pth", {"model_state_dict": source_model.state_dict()})
    first = load_generalist(path, arch=small_config())
    assert load_generalist(str(path), arch=small_config()) is first
    assert load_generalist(path, arch=small_config(), device="cpu") is first
    assert load_generalist(path, arch=small_config("other_name")) is not first
    clear_generalist_cache()
    assert load_generalist(path, arch=small_config()) is not first
