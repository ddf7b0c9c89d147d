"""VNet: numerical match with the official UA-MT goldens, state-dict layout, config inference."""
import copy
import json
import re

import pytest
import torch

from networks.vnet import NORMALIZATIONS, ConvTranspose3d, VNet, vnet_config_from_state_dict

TOL = dict(rtol=1e-4, atol=1e-5)
LOW_RES_BLOCKS = ("block_three", "block_four", "block_five", "block_six", "block_seven")

# (block, number of conv stages, kind) in official order, as UA-MT's vnet.py builds them; the expected key names
# are rebuilt from this list independently of networks/vnet.py.
LAYOUT = [("block_one", 1, "conv"), ("block_one_dw", 1, "down"), ("block_two", 2, "conv"),
          ("block_two_dw", 1, "down"), ("block_three", 3, "conv"), ("block_three_dw", 1, "down"),
          ("block_four", 3, "conv"), ("block_four_dw", 1, "down"), ("block_five", 3, "conv"),
          ("block_five_up", 1, "up"), ("block_six", 3, "conv"), ("block_six_up", 1, "up"),
          ("block_seven", 3, "conv"), ("block_seven_up", 1, "up"), ("block_eight", 2, "conv"),
          ("block_eight_up", 1, "up"), ("block_nine", 1, "conv")]


def expected_keys(normalization: str) -> list[str]:
    norm_keys = {"batchnorm": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
                 "groupnorm": ["weight", "bias"], "instancenorm": [], "none": []}[normalization]
    stride = 2 if normalization == "none" else 3
    keys = []
    for block, stages, _ in LAYOUT:
        for s in range(stages):
            keys += [f"{block}.conv.{stride * s}.weight", f"{block}.conv.{stride * s}.bias"]
            keys += [f"{block}.conv.{stride * s + 1}.{k}" for k in norm_keys]
    return keys + ["out_conv.weight", "out_conv.bias"]


def golden_files(fixtures_dir):
    files = sorted(fixtures_dir.glob("vnet_golden_*.pt"))
    assert fixtures_dir / "vnet_golden_a.pt" in files
    return files


def test_goldens_match_official_outputs_and_intermediates(fixtures_dir):
    # Runs every golden present (a here; b too when the held-back file is added).
    for path in golden_files(fixtures_dir):
        fx = torch.load(path, weights_only=True)
        net = VNet(**fx["config"])
        net.load_state_dict(fx["state_dict"], strict=True)
        assert vnet_config_from_state_dict(fx["state_dict"]) == {
            k: fx["config"][k] for k in ("n_channels", "n_classes", "n_filters", "normalization")}
        net.eval()
        captured = {}
        hooks = [getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone()))
            for name in LOW_RES_BLOCKS]
        with torch.no_grad():
            out = net(fx["input"])
            out_no_drop = net(fx["input"], turnoff_drop=True)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(out, fx["output"], **TOL, msg=f"{path.name}: output")
        torch.testing.assert_close(out_no_drop, fx["output"], **TOL)
        assert set(fx["intermediates"]) == set(LOW_RES_BLOCKS)
        for name in LOW_RES_BLOCKS:
            torch.testing.assert_close(captured[name], fx["intermediates"][name], **TOL,
                                       msg=f"{path.name}: {name}")


def test_full_size_state_dict_equals_manifest(fixtures_dir):
    manifest = json.loads((fixtures_dir / "vnet_state_dict.json").read_text())
    net = VNet(n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=True)
    sd = net.state_dict()
    entries = manifest["state_dict"]
    assert len(entries) == len(sd) == 205
    assert [e["name"] for e in entries] == list(sd)
    params = dict(net.named_parameters())
    for e in entries:
        t = sd[e["name"]]
        assert list(t.shape) == e["shape"], e["name"]
        assert str(t.dtype).removeprefix("torch.") == e["dtype"], e["name"]
        assert (e["name"] in params) == (e["kind"] == "parameter"), e["name"]
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == manifest["total_parameters"] == 9_448_866


CONFIGS = [(norm, drop, nf) for norm in NORMALIZATIONS for drop in (False, True)
           for nf in ((16,) if norm == "groupnorm" else (4, 16))]


@pytest.mark.parametrize("normalization,has_dropout,n_filters", CONFIGS)
def test_every_legal_config_layout_shape_and_config_roundtrip(normalization, has_dropout, n_filters):
    torch.manual_seed(0)
    net = VNet(n_channels=1, n_classes=3, n_filters=n_filters, normalization=normalization,
               has_dropout=has_dropout).eval()
    sd = net.state_dict()
    assert list(sd) == expected_keys(normalization)
    assert sd["block_five.conv.0.weight"].shape == (16 * n_filters, 16 * n_filters, 3, 3, 3)
    assert sd["block_five_up.conv.0.weight"].shape == (16 * n_filters, 8 * n_filters, 2, 2, 2)  # ConvT: (in, out, k)
    cfg = vnet_config_from_state_dict(sd)
    assert cfg == dict(n_channels=1, n_classes=3, n_filters=n_filters, normalization=normalization)
    clone = VNet(**cfg, has_dropout=has_dropout)
    clone.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, 48, 32, 16)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(clone.eval()(x), out, rtol=0, atol=0)
    assert out.shape == (1, 3, 48, 32, 16)


def test_held_back_fixture_b_config_has_60_entries_and_loads_strictly():
    # Golden b: instancenorm, no dropout, n_filters 4, input 48x32x16 -> 60 conv-only entries.
    net = VNet(n_channels=1, n_classes=2, n_filters=4, normalization="instancenorm", has_dropout=False)
    sd = net.state_dict()
    assert len(sd) == 60
    assert all(re.fullmatch(r"(block_\w+\.conv\.(0|3|6)|out_conv)\.(weight|bias)", k) for k in sd)
    fresh = VNet(**vnet_config_from_state_dict(sd), has_dropout=False)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.eval()(torch.randn(1, 1, 48, 32, 16)).shape == (1, 2, 48, 32, 16)


@pytest.mark.parametrize("size", [(40, 32, 32), (24, 32, 32), (32, 32, 8), (32, 0, 32)])
def test_bad_spatial_size_raises_naming_it(size):
    net = VNet(n_filters=4)
    with pytest.raises(ValueError, match=re.escape(str(size))):
        net(torch.zeros(1, 1, *size))


def test_bad_inputs_and_options_raise_clearly():
    with pytest.raises(ValueError, match="5-D"):
        VNet(n_filters=4)(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        VNet(n_filters=8, normalization="groupnorm")
    with pytest.raises(ValueError, match="layernorm"):
        VNet(normalization="layernorm")
    with pytest.raises(KeyError, match="block_one.conv.0.weight"):
        vnet_config_from_state_dict({"conv.weight": torch.zeros(1)})


def test_dropout_only_when_enabled_and_not_turned_off():
    torch.manual_seed(1)
    with_drop = VNet(n_filters=4, normalization="none", has_dropout=True).train()
    without = VNet(n_filters=4, normalization="none", has_dropout=False).train()
    without.load_state_dict(with_drop.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        a, b = with_drop(x), with_drop(x)
        off = with_drop(x, turnoff_drop=True)
        ref = without(x)
    assert not torch.equal(a, b)  # channels dropped at random in train mode
    torch.testing.assert_close(off, ref, rtol=0, atol=0)
    assert with_drop.has_dropout  # turnoff_drop leaves the module unchanged


def test_channels_last_3d_gives_same_logits():
    torch.manual_seed(2)
    net = VNet(n_filters=4).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        out = net_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("levels", [1, 2, 5])
def test_activation_checkpointing_gives_identical_outputs_gradients_and_running_stats(levels):
    # recomputing blocks in backward must not change the maths, replay the same dropout masks, and must
    # not update BatchNorm's running statistics a second time
    torch.manual_seed(0)
    plain = VNet(n_filters=4, has_dropout=True).train()
    ck = copy.deepcopy(plain)
    ck.checkpoint_levels = levels
    x = torch.randn(2, 1, 32, 32, 16)
    outs = []
    for net in (plain, ck):
        torch.manual_seed(1)
        out = net(x)
        (out.softmax(1)[:, 1] ** 2).mean().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), ck.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.state_dict().items(), ck.state_dict().values()):
        assert torch.equal(a, b), name   # running_mean / running_var / num_batches_tracked updated once
    assert plain.block_one.conv[1].num_batches_tracked.item() == 1


def test_activation_checkpointing_setting_is_validated_and_not_in_the_state_dict():
    net = VNet(n_filters=4)
    keys = list(net.state_dict())
    net.checkpoint_levels = 2
    assert list(net.state_dict()) == keys and net.checkpoint_levels == 2
    for bad in (-1, 6, 1.5):
        with pytest.raises(ValueError, match="checkpoint_levels"):
            net.checkpoint_levels = bad


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_transpose_backward_matches_pytorch(amp, channels_last):
    """The V-Net's ConvTranspose3d (summed bias gradient on CPU) gives PyTorch's output and input / weight
    gradients bit for bit, its bias gradient up to summation order, under bf16 autocast too."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(3)
    ref = torch.nn.ConvTranspose3d(8, 4, 2, stride=2).to(memory_format=fmt)
    ours = ConvTranspose3d(8, 4, 2, stride=2).to(memory_format=fmt)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 6, 5, 4).contiguous(memory_format=fmt)
    upstream = torch.randn(2, 4, 12, 10, 8)
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = module(xi)
        (y.float() * upstream).sum().backward()
        results.append((y, xi.grad, module.weight.grad, module.bias.grad))
    (y_ref, gx_ref, gw_ref, gb_ref), (y, gx, gw, gb) = results
    assert y.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    assert gb.dtype == torch.float32 and gb.abs().min() > 1.0
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5 if not amp else 1e-2, atol=1e-4)
    # no autograd: the plain module's forward
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_vnet_upsampling_uses_the_fast_backward_and_keeps_state_dict_keys():
    net = VNet(n_filters=4)
    ups = [net.block_five_up, net.block_six_up, net.block_seven_up, net.block_eight_up]
    assert all(type(b.conv[0]) is ConvTranspose3d for b in ups)
    assert all(isinstance(b.conv[0], torch.nn.ConvTranspose3d) for b in ups)
    assert "block_eight_up.conv.0.weight" in net.state_dict() and "block_eight_up.conv.0.bias" in net.state_dict()
