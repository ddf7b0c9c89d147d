"""The bf16 convolution probe that refuses ``--amp bf16`` trainings on a platform defect (training/amp_check.py)."""
import pytest
import torch

from training import amp_check
from utils import bf16
from training.amp_check import bf16_conv_weight_grad_ok, check_bf16_training, vnet_level_depths
from training.run import main
from tests.test_train_common import run_args

REAL_BACKWARD = torch.ops.aten.convolution_backward


def _garbage_in_bf16(*args):
    """ATen's convolution backward, except that the bf16 weight gradient is garbage (what the defect does)."""
    out = list(REAL_BACKWARD(*args))
    if args[0].dtype == torch.bfloat16 and out[1] is not None:
        out[1] = torch.full_like(out[1], 1e30)
    return tuple(out)


def _direct_check(depth: int) -> bool:
    """The same comparison written out: bf16 vs float32 weight gradient of one 3x3x3 conv."""
    g = torch.Generator().manual_seed(5)
    x, grad = torch.randn(2, 16, depth, 6, 5, generator=g), torch.randn(2, 16, depth, 6, 5, generator=g)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    ref = REAL_BACKWARD(grad, x, conv.weight, [16], [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1,
                        [False, True, False])[1]
    bf = REAL_BACKWARD(grad.bfloat16(), x.bfloat16(), conv.weight.bfloat16(), [16], [1] * 3, [1] * 3, [1] * 3,
                       False, [0] * 3, 1, [False, True, False])[1].float()
    return bool((bf - ref).abs().max() <= 0.05 * ref.abs().max())


def test_probe_detects_wrong_bf16_weight_gradients():
    assert bf16_conv_weight_grad_ok(3)                                    # right on every platform we know
    assert not bf16_conv_weight_grad_ok(3, backward=_garbage_in_bf16)
    assert not bf16_conv_weight_grad_ok(3, memory_format=torch.channels_last_3d, backward=_garbage_in_bf16)


@pytest.mark.parametrize("depth", [2, 4])
def test_probe_agrees_with_a_direct_comparison_on_this_machine(depth):
    # depth 2 is wrong on the project's AVX-512-bf16 CPU and may be right elsewhere: the probe must say which
    assert bf16_conv_weight_grad_ok(depth) == _direct_check(depth)


def _as_if_native(monkeypatch):
    """Skip the native-bf16 refusal, so the defect probe's refusal is tested on every CPU."""
    monkeypatch.setattr(amp_check, "require_native_bf16", lambda device: None)


def test_level_depths_and_the_refusal_message(monkeypatch):
    _as_if_native(monkeypatch)
    assert vnet_level_depths(32) == [32, 16, 8, 4, 2] and vnet_level_depths(112) == [112, 56, 28, 14, 7]
    monkeypatch.setattr(amp_check, "bf16_conv_weight_grad_ok", lambda depth, *a, **k: depth != 2)
    check_bf16_training((48, 32, 16), torch.device("cpu"))               # levels 48, 24, 12, 6, 3
    with pytest.raises(ValueError, match=r"depth 2, which V-Net level 4 of patch_size \(32, 32, 16\)"):
        check_bf16_training((32, 32, 16), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"level 3 of patch_size \(16, 16, 16\)"):
        check_bf16_training((16, 16, 16), torch.device("cpu"))


def test_bf16_training_is_refused_before_any_step(monkeypatch, la_root, la_data_dir, tmp_path):
    _as_if_native(monkeypatch)
    monkeypatch.setattr(amp_check, "bf16_conv_weight_grad_ok", lambda depth, *a, **k: depth != 2)
    train_list = tmp_path / "train.list"
    train_list.write_text("\n".join((la_root / "train.list").read_text().split()[:3]) + "\n")
    with pytest.raises(ValueError, match="--amp bf16 is unsafe here"):
        main({}, run_args(la_data_dir, train_list, tmp_path, "bf16_refused", "--amp", "bf16"))
    assert not (tmp_path / "bf16_refused" / "train_state.pth").exists()


# ------------------------------------------------------------------ CPUs without native bfloat16 (utils.bf16)
def test_native_bf16_probe_can_be_forced_off(monkeypatch):
    monkeypatch.setenv(bf16.FORCE_ENV, "0")
    assert not bf16.native_cpu_bf16() and not bf16.bf16_supported("cpu")
    assert bf16.bf16_supported("cuda") and bf16.bf16_supported(torch.device("meta"))   # only CPUs are probed
    bf16.require_native_bf16("meta")
    with pytest.raises(bf16.NoNativeBf16Error, match=r"^--amp bf16: this CPU has no native bfloat16 support "
                                                     r"\(oneDNN needs AVX-512.*use --amp none") as err:
        bf16.require_native_bf16("cpu")
    assert "\n" not in str(err.value)
    monkeypatch.setenv(bf16.FORCE_ENV, "yes")
    with pytest.raises(ValueError, match="SEMISAM_CPU_BF16='yes': expected 0"):
        bf16.native_cpu_bf16()
    monkeypatch.setenv(bf16.FORCE_ENV, "auto")
    assert bf16.native_cpu_bf16() == bf16._probe()


def test_bf16_training_is_refused_without_native_bf16(monkeypatch, la_root, la_data_dir, tmp_path):
    monkeypatch.setenv(bf16.FORCE_ENV, "0")
    train_list = tmp_path / "train.list"
    train_list.write_text("\n".join((la_root / "train.list").read_text().split()[:3]) + "\n")
    with pytest.raises(bf16.NoNativeBf16Error, match="no native bfloat16"):
        main({}, run_args(la_data_dir, train_list, tmp_path, "bf16_emulated", "--amp", "bf16"))
    assert not (tmp_path / "bf16_emulated" / "train_state.pth").exists()


def test_bf16_evaluation_is_refused_without_native_bf16(monkeypatch, la_data_dir, tmp_path):
    import test_LA
    monkeypatch.setenv(bf16.FORCE_ENV, "0")
    with pytest.raises(bf16.NoNativeBf16Error, match="no native bfloat16"):
        test_LA.main(["--root_path", str(la_data_dir), "--model_path", str(tmp_path / "any.pth"), "--amp", "bf16",
                      "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
