"""Whole-volume inference for the V-Net specialist: sliding window, post-processing, evaluation, loading.

``sliding_window_predict`` places windows exactly as UA-MT's ``test_util.test_single_case`` does and
averages the softmax of overlapping windows the same way, so label maps match the official ones; it
runs several windows per forward pass, on any device, optionally under bf16 autocast.
"""
from __future__ import annotations

import copy
import json
import itertools
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from scipy import ndimage

from dataloaders.la_heart import load_case
from networks.vnet import VNet, vnet_config_from_state_dict
from utils.bf16 import native_cpu_bf16
from utils.errors import CheckpointError, ConfigError, MissingFileError
from utils.io import TRAIN_STATE_FORMAT, compare_state_dict, read_checkpoint, strip_wrapper_prefixes
from utils.metrics import calculate_metric_percase
from utils.runtime import autocast

# CheckpointError (utils.errors, a ValueError): a checkpoint file that cannot be turned into a VNet (wrong format
# or keys); imported here, where it is raised, so ``from utils.inference import CheckpointError`` keeps working


# ----------------------------------------------------------------------------------------- sliding window

def _positive_ints(values, name: str, n: int) -> tuple[int, ...]:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,) * n
    if len(values) != n or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"{name} must be {n} positive int(s), got {values!r}")
    return tuple(int(v) for v in values)


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Official placement along one axis: ceil((size - patch) / stride) + 1 windows, the last one flush
    with the end (start = min(stride * i, size - patch)). Requires size >= patch."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


def _pad_widths(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Official padding of axes smaller than the patch: (p - s) // 2 before, the rest after."""
    widths = []
    for s, p in zip(shape, patch):
        total = max(p - s, 0)
        widths.append((total // 2, total - total // 2))
    return widths


def _check_net_device(net: torch.nn.Module, device: torch.device) -> None:
    param = next(net.parameters(), None)
    if param is None:
        return
    have = param.device
    if have.type != device.type or (device.index is not None and have.index != device.index):
        raise ValueError(f"the network's weights are on {have} but device={str(device)!r}; "
                         f"move the network with net.to({str(device)!r}) first")


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``net`` in which every BatchNorm3d that directly follows a Conv3d or
    ConvTranspose3d in a ``Sequential`` (the V-Net's conv, norm, ReLU stages) is folded into that convolution:
    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta`` per output channel, the
    norm replaced by an Identity (same outputs up to rounding, one pass over each activation fewer).
    ``net`` itself is not changed."""
    folded = copy.deepcopy(net).eval()
    for seq in folded.modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if not (isinstance(conv, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
                    and isinstance(norm, torch.nn.BatchNorm3d) and norm.track_running_stats):
                continue
            with torch.no_grad():
                scale = (norm.running_var.double() + norm.eps).rsqrt()
                if norm.weight is not None:
                    scale = scale * norm.weight.double()
                shift = -norm.running_mean.double() * scale
                if norm.bias is not None:
                    shift = shift + norm.bias.double()
                # output channels: dim 0 of a Conv3d weight, dim 1 of a ConvTranspose3d weight
                view = (1, -1, 1, 1, 1) if isinstance(conv, torch.nn.ConvTranspose3d) else (-1, 1, 1, 1, 1)
                weight = conv.weight.double() * scale.view(view)
                bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
                conv.weight.copy_(weight.to(conv.weight.dtype))
                if conv.bias is None:
                    conv.bias = torch.nn.Parameter(torch.zeros_like(norm.running_mean))
                conv.bias.copy_((bias * scale + shift).to(conv.bias.dtype))
            seq[i + 1] = torch.nn.Identity()
    return folded


class _ConvReLU(torch.nn.Module):
    """A Conv3d / ConvTranspose3d and the ReLU after it as one oneDNN call (ReLU post-op), for inference copies
    only (the wrapped conv's keys gain a ``.conv``). (B, C, X, Y, Z) -> (B, C', X', Y', Z'), CPU only, no
    autocast (the weights' dtype rules)."""

    def __init__(self, conv: torch.nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if isinstance(c, torch.nn.ConvTranspose3d):
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.output_padding), list(c.stride), list(c.dilation),
                c.groups, "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise(
            x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups, "relu", [], "")


def can_fuse_conv_relu() -> bool:
    """True when this torch build has oneDNN's fused convolution + ReLU ops (CPU)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_convolution_transpose_pointwise"))


def fuse_conv_relu(net: torch.nn.Module) -> torch.nn.Module:
    """In place: in every ``Sequential``, a Conv3d / ConvTranspose3d followed by a ReLU (with an Identity left
    by :func:`fold_batchnorm` in between, or not) becomes one :class:`_ConvReLU`; the ReLU slot becomes an
    Identity. The same outputs up to float rounding: oneDNN may choose another kernel for the fused op (on the
    project's CPU bit-identical for 112x112x80 windows, 1-2 ulp apart at 32x32x16; tested to 1e-6). It makes
    CPU inference faster (results/history.md, "Third CPU pass", "Where the misses stand", and "Numbers moved
    out of code comments"). For eval-mode copies used without autocast (the fused ops do not autocast:
    convert the copy to the wanted dtype instead). Returns ``net``."""
    for seq in net.modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if not isinstance(seq[i], (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                continue
            j = i + 2 if isinstance(seq[i + 1], torch.nn.Identity) and i + 2 < len(seq) else i + 1
            if isinstance(seq[j], torch.nn.ReLU):
                seq[i] = _ConvReLU(seq[i])
                seq[j] = torch.nn.Identity()
    return net


# devices where channels_last_3d made the V-Net faster, training steps and inference alike, measured by our
# benchmarks: CPU (oneDNN; results/history.md, "Second pass", item 1, and results/README.md, "Fourth CPU
# pass") and CUDA (an H100 with cuDNN; results/history.md, "First GPU pass", item 1)
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def channels_last_default(device: torch.device | str) -> bool:
    """The ``channels_last`` 'auto' rule of training, validation and test_LA.py: on for CPU and CUDA."""
    return torch.device(device).type in CHANNELS_LAST_DEVICES


def _no_timer(name: str) -> ContextManager:
    return nullcontext()


def canonical_strides(shape: Sequence[int], memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides ``torch.empty(shape, memory_format=memory_format)`` gets."""
    return torch.empty(tuple(shape), device="meta", memory_format=memory_format).stride()


@contextmanager
def _memory_format(net: torch.nn.Module, channels_last: bool):
    """Run ``net`` with its conv weights in channels_last_3d (or contiguous) layout, restoring their exact
    strides afterwards.

    The layout is judged by the strides, not ``is_contiguous(memory_format=...)``: a weight with one input
    channel (the V-Net's first conv, (F, 1, 3, 3, 3)) passes that test for both layouts, and a loaded checkpoint
    leaves it with contiguous strides. With such a weight and a one-channel input (which passes it too),
    oneDNN ran the whole V-Net forward slower on this project's CPU (results/README.md, "Fourth CPU pass",
    item 1)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    weights = [p for p in net.parameters() if p.dim() == 5]
    restore = {p: p.stride() for p in weights if p.stride() != canonical_strides(p.shape, fmt)}
    for p in restore:
        p.data = p.data.clone(memory_format=fmt)
    try:
        yield fmt
    finally:
        for p, stride in restore.items():
            p.data = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device).copy_(p.data)


def sliding_window_predict(net: torch.nn.Module, image, patch_size=(112, 112, 80), stride_xy: int = 18,
                           stride_z: int = 4, num_classes: int = 2, window_batch: int = 4, amp_dtype=None,
                           device="cpu", channels_last: bool | None = None,
                           fold_bn: bool = True, timer: Callable[[str], ContextManager] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Segment a whole volume with overlapping windows (UA-MT ``test_single_case`` semantics).

    Args:
        net: maps (B, 1, px, py, pz) to logits (B, num_classes, px, py, pz); must already be on ``device``.
            It runs in eval mode (its previous mode is restored afterwards).
        image: (X, Y, Z) array, any real dtype (cast to float32).
        patch_size: window (px, py, pz). Axes smaller than it are zero-padded, (p - s) // 2 before and the
            rest after, and the padding is cropped off the results.
        stride_xy: window stride along X and Y; stride_z: along Z.
        num_classes: expected channels of the logits.
        window_batch: windows per forward pass; the same windows are summed in the same order, so results
            differ only by the rounding of batched convolutions (~1e-7).
        amp_dtype: None (float32) or e.g. torch.bfloat16 for autocast; softmax and accumulation stay float32.
        device: where the windows run and the scores accumulate.
        channels_last: run the windows and the net's conv weights in channels_last_3d layout (the weights'
            layout is restored afterwards); None = ``channels_last_default(device)`` (on for CPU and
            CUDA, where it was measured faster).
        fold_bn: run a copy of the net with its eval-mode BatchNorm folded into the convolutions
            (``fold_batchnorm``: same scores up to rounding, one pass over each activation fewer) and, on CPU,
            each conv + ReLU as one oneDNN call (``fuse_conv_relu``: same scores up to rounding; in bf16 only on
            CPUs with native bfloat16, ``utils.bf16.native_cpu_bf16``); both faster, measured in
            results/history.md ("Second pass", "Inference"; "Third CPU pass").
        timer: optional ``timer(name)`` context-manager factory (e.g. ``training.timing.SectionTimer``) that
            gets the parts of the call: 'prepare' (the folded copy and its layout), 'windows' (cutting and
            stacking), 'forward' (the network calls), 'accumulate' (softmax and window sums), 'finish'
            (averaging, label map, crop and copy to numpy). For benchmarks; the results are the same.

    Returns:
        label_map np.uint8 (X, Y, Z): argmax of the averaged probabilities (first class on ties);
        score_map np.float32 (C, X, Y, Z): per voxel, the mean softmax over the windows covering it.
    """
    timer = timer or _no_timer
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3-D (X, Y, Z) array, got shape {image.shape}")
    patch = _positive_ints(patch_size, "patch_size", 3)
    stride_xy = _positive_ints(stride_xy, "stride_xy", 1)[0]
    stride_z = _positive_ints(stride_z, "stride_z", 1)[0]
    window_batch = _positive_ints(window_batch, "window_batch", 1)[0]
    device = torch.device(device)
    _check_net_device(net, device)

    pads = _pad_widths(image.shape, patch)
    padded = np.pad(image.astype(np.float32, copy=False), pads, mode="constant", constant_values=0)
    starts = list(itertools.product(*(window_starts(s, p, st) for s, p, st in
                                      zip(padded.shape, patch, (stride_xy, stride_xy, stride_z)))))
    volume = torch.from_numpy(padded).to(device)
    score = torch.zeros((num_classes,) + padded.shape, dtype=torch.float32, device=device)
    count = torch.zeros(padded.shape, dtype=torch.float32, device=device)
    px, py, pz = patch

    if channels_last is None:
        channels_last = channels_last_default(device)
    was_training = net.training
    net.eval()
    try:
        with timer("prepare"):
            run = fold_batchnorm(net) if fold_bn else net
            # The folded copy is ours: on CPU its conv + ReLU pairs become single oneDNN calls, which do not
            # autocast, so the copy is converted to the autocast dtype instead; it then computes what autocast
            # would (the V-Net's convolutions in that dtype, everything else in their inputs' dtype), up to the
            # rounding of the fused kernels (bit for bit for LA-sized windows on the project's CPU).
            # oneDNN's fused bf16 kernels exist only on CPUs with native bfloat16 (utils.bf16); elsewhere the
            # plain autocast computation below gives the same maths
            fused = (fold_bn and device.type == "cpu" and can_fuse_conv_relu()
                     and (amp_dtype is None or native_cpu_bf16()))
            input_dtype = amp_dtype if fused else None        # None: the windows stay float32
            autocast_dtype = None if fused else amp_dtype
            if fused:
                run = fuse_conv_relu(run.to(input_dtype) if input_dtype is not None else run)
            # windows overlap: converting the volume once gives the same window values as converting each
            source = volume.to(input_dtype) if input_dtype is not None else volume
        with torch.inference_mode(), _memory_format(run, channels_last) as fmt:
            for first in range(0, len(starts), window_batch):
                chunk = starts[first:first + window_batch]
                with timer("windows"):
                    batch = torch.stack([source[x:x + px, y:y + py, z:z + pz] for x, y, z in chunk]).unsqueeze(1)
                    batch = batch.contiguous(memory_format=fmt)
                with timer("forward"), autocast(device, autocast_dtype):
                    logits = run(batch)
                if logits.shape[1] != num_classes:
                    raise ValueError(f"the network outputs {logits.shape[1]} classes but num_classes={num_classes}")
                with timer("accumulate"):
                    probs = torch.softmax(logits, dim=1, dtype=torch.float32)   # = softmax(logits.float())
                    # One window at a time, in the official order, so the float sums are the official ones.
                    for (x, y, z), p in zip(chunk, probs):
                        score[:, x:x + px, y:y + py, z:z + pz] += p
                        count[x:x + px, y:y + py, z:z + pz] += 1
    finally:
        net.train(was_training)

    with timer("finish"):
        score /= count
        # max(dim).indices: the same first-maximum index as argmax, much faster over a short leading dim on CPU
        # (results/history.md, "Third CPU pass", item 2 of what changed)
        label = score.max(dim=0).indices.to(torch.uint8)
        crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, image.shape))
        return label[crop].cpu().numpy(), score[(slice(None),) + crop].cpu().numpy()


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected foreground (non-zero) component of an (X, Y, Z) mask.

    Same dtype and shape as ``mask``; kept voxels keep their values, all others become 0. Full
    connectivity matches the official ``skimage.measure.label`` default; on equal sizes the component
    met first in C (raster) order wins, as with the official ``argmax``. An empty mask is returned
    unchanged (the official code asserted on it).
    """
    mask = np.asarray(mask)
    labels, n = ndimage.label(mask != 0, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n == 0:
        return mask.copy()
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return np.where(labels == largest, mask, np.zeros_like(mask))


def largest_component_per_class(label: np.ndarray) -> np.ndarray:
    """(X, Y, Z) integer label map -> the same with, for each class k > 0, only the largest 26-connected
    component of ``label == k`` kept (other voxels of that class become 0). Binary maps: the same result as
    :func:`largest_connected_component`."""
    label = np.asarray(label)
    out = np.zeros_like(label)
    for k in np.unique(label):
        if k == 0:
            continue
        keep = largest_connected_component(label == k)
        out[keep] = k
    return out


# ------------------------------------------------------------------------------------------- evaluation

def evaluate(net: torch.nn.Module, base_dir, cases: Sequence[str], *, patch_size=(112, 112, 80),
             stride_xy: int = 18, stride_z: int = 4, num_classes: int = 2, post_process: bool = True,
             spacing=None, window_batch: int = 4, amp_dtype=None, device="cpu",
             on_case: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> list[dict]:
    """Predict and score every case of ``cases`` (folders under ``base_dir``, read with ``load_case``).

    Post-processing keeps the largest connected foreground component. Metrics compare foreground
    (label != 0) with the ground truth; distances are in voxels, or in spacing units (mm) when
    ``spacing`` is given. ``on_case(case, image, label, prediction)`` is called after each case
    (e.g. to save files). Returns one dict per case: case, dice, jaccard, hd95, asd, seconds.
    """
    records = []
    for case in cases:
        image, label = load_case(base_dir, case, with_label=True)
        start = time.perf_counter()
        prediction, _ = sliding_window_predict(net, image, patch_size, stride_xy, stride_z, num_classes,
                                               window_batch, amp_dtype, device)
        if post_process:
            prediction = largest_connected_component(prediction)
        dice, jaccard, hd95, asd = calculate_metric_percase(prediction, label, spacing)
        records.append(dict(case=case, dice=dice, jaccard=jaccard, hd95=hd95, asd=asd,
                            seconds=time.perf_counter() - start))
        if on_case is not None:
            on_case(case, image, label, prediction)
    return records


def class_metrics(prediction: np.ndarray, label: np.ndarray, num_classes: int, spacing=None) -> dict:
    """Per foreground class k (1..K-1): {k: {'dice', 'jaccard', 'hd95', 'asd'}} of ``prediction == k`` against
    ``label == k`` (``calculate_metric_percase``'s rules); a class absent from both gets NaN (nothing to score,
    left out of means, as nnU-Net does) instead of a perfect score."""
    out = {}
    for k in range(1, num_classes):
        pred_k, gt_k = prediction == k, label == k
        if not pred_k.any() and not gt_k.any():
            out[k] = dict.fromkeys(("dice", "jaccard", "hd95", "asd"), float("nan"))
            continue
        dice, jaccard, hd95, asd = calculate_metric_percase(pred_k, gt_k, spacing)
        out[k] = dict(dice=dice, jaccard=jaccard, hd95=hd95, asd=asd)
    return out


def evaluate_classes(net: torch.nn.Module, base_dir, cases: Sequence[str], num_classes: int, *,
                     patch_size=(112, 112, 80), stride_xy: int = 18, stride_z: int = 4, post_process: bool = True,
                     spacing=None, window_batch: int = 4, amp_dtype=None, device="cpu",
                     on_case: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> list[dict]:
    """:func:`evaluate` for K classes: one dict per case with 'case', 'seconds' and 'classes' ({k: metrics},
    :func:`class_metrics`); post-processing keeps the largest component of each class."""
    records = []
    for case in cases:
        image, label = load_case(base_dir, case, with_label=True, num_classes=num_classes)
        start = time.perf_counter()
        prediction, _ = sliding_window_predict(net, image, patch_size, stride_xy, stride_z, num_classes,
                                               window_batch, amp_dtype, device)
        if post_process:
            prediction = largest_component_per_class(prediction)
        records.append(dict(case=case, classes=class_metrics(prediction, label, num_classes, spacing),
                            seconds=time.perf_counter() - start))
        if on_case is not None:
            on_case(case, image, label, prediction)
    return records


# ---------------------------------------------------------------------------------------------- loading

def _check_fit(path: Path, net: VNet, sd: dict, config: dict) -> None:
    report = compare_state_dict(net.state_dict(), sd)
    if report:
        raise CheckpointError(f"checkpoint {path} does not fit VNet({config}): {report}")


def load_specialist(path, n_filters: int | None = None, normalization: str | None = None,
                    device="cpu") -> tuple[VNet, dict]:
    """Build a VNet from a checkpoint and load it strictly; returns (net in eval mode on device, config).

    Accepted files: a plain student state dict (official ``iter_N.pth``; ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes are stripped), whose architecture is inferred from the keys; or our training
    state (``format == 'semisam_train_state'``): weights from ``['student']``, kwargs from ``['config']['vnet']``.
    ``n_filters`` / ``normalization`` override the stored or inferred values.
    Raises MissingFileError (a FileNotFoundError) for a missing file and CheckpointError listing unexpected,
    missing or mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    # Official iter_N.pth and our train_state.pth hold only tensors and plain containers, so the safe
    # loader suffices; anything else is refused rather than unpickled.
    obj = read_checkpoint(path, error=CheckpointError)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict "
                              f"or a '{TRAIN_STATE_FORMAT}' file")
    if obj.get("format") == TRAIN_STATE_FORMAT:
        for key in ("student", "config"):
            if key not in obj:
                raise CheckpointError(f"training state {path} lacks the {key!r} entry")
        if "vnet" not in obj["config"]:
            raise CheckpointError(f"training state {path}: config lacks the 'vnet' entry (VNet kwargs)")
        sd = strip_wrapper_prefixes(obj["student"])
        config = dict(obj["config"]["vnet"])
    else:
        sd = strip_wrapper_prefixes(obj)
        try:
            config = vnet_config_from_state_dict(sd)
        except KeyError as err:
            raise CheckpointError(f"checkpoint {path}: {err.args[0]}; keys ({len(sd)}): {list(sd)[:20]}"
                                  + (" ..." if len(sd) > 20 else "")) from None
    if n_filters is not None:
        config["n_filters"] = n_filters
    if normalization is not None:
        config["normalization"] = normalization
    try:
        net = VNet(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot build VNet({config}): {err}") from None
    _check_fit(path, net, sd, config)
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval(), config


def training_config_beside(checkpoint) -> dict | None:
    """The ``config.json`` a training run wrote beside its checkpoints (its settings: patch_size, n_filters,
    ...), or None when the checkpoint's folder has none (e.g. a released model)."""
    path = Path(checkpoint).parent / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


DEFAULT_WINDOW = (112, 112, 80)     # UA-MT's test_LA.py window (SemiSAM's evaluates with its 128^3 training patch)


def window_for(ckpt, patch_size=None, default=DEFAULT_WINDOW) -> list[int]:
    """The sliding window for a checkpoint, said on stdout: ``patch_size`` when given (with a note when it
    differs from the training patch in config.json beside the checkpoint), else that training patch, else
    ``default``."""
    ckpt = Path(ckpt)
    trained = training_config_beside(ckpt)
    trained_patch = list(trained["patch_size"]) if trained and "patch_size" in trained else None
    if patch_size is None:
        if trained_patch is None:
            print(f"window {tuple(default)} (no config.json beside {ckpt})")
            return list(default)
        print(f"window {tuple(trained_patch)}: the training patch, from {ckpt.parent / 'config.json'}")
        return trained_patch
    if trained_patch is not None and list(patch_size) != trained_patch:
        print(f"note: --patch_size {tuple(patch_size)} differs from the training patch {tuple(trained_patch)} in "
              f"{ckpt.parent / 'config.json'}")
    return list(patch_size)


def load_for_classes(path, class_names: Sequence[str], device="cpu") -> tuple[VNet, dict]:
    """:func:`load_specialist`, checked to output one channel per class of ``class_names`` (background first)."""
    net, config = load_specialist(path, device=device)
    if int(config["n_classes"]) != len(class_names):
        raise CheckpointError(f"{path}: the network has {config['n_classes']} output classes but the dataset has "
                              f"{len(class_names)} labels {list(class_names)}")
    return net, config


def checkpoint_path(model_dir, iteration) -> Path:
    """UA-MT's names: ``<model_dir>/iter_<N>.pth``; ``iteration='best'`` -> ``best_model.pth``."""
    if str(iteration) == "best":
        return Path(model_dir) / "best_model.pth"
    try:
        n = int(iteration)
    except ValueError:
        raise ConfigError(f"iteration must be an integer or 'best', got {iteration!r}") from None
    return Path(model_dir) / f"iter_{n}.pth"


__all__ = ["CheckpointError", "checkpoint_path", "evaluate", "largest_connected_component", "load_specialist",
           "sliding_window_predict", "window_starts"]
