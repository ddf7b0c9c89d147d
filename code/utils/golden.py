"""The golden fixtures' recipe: configs, re-randomisation, inputs, calls, forward-hook taps, file layout, comparison.

``make_golden_fixtures.py`` runs this recipe on the official SAM-Med3D and V-Net classes (loaded from the official
repositories at their pinned commits) to write ``sam3d_golden_{a,b}.pt``, ``vnet_golden_{a,b}.pt`` and the two
state-dict manifests, exactly as the fixtures' README (sections 1-4) describes them. Nothing here imports the
official code: every function takes the model classes as arguments (:class:`OfficialModules`), so the tests run
the same recipe on this repository's reimplementation (``networks.sam_med3d``, ``networks.vnet``: same constructor
keyword arguments and state-dict names) and check it against the shared fixtures without the official code.

The config translation below (:func:`sam_kwargs`) is deliberately separate from ``networks.sam_med3d.build``: the
generator must not depend on the reimplementation it is meant to check.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from utils.io import file_digest

__all__ = ["OfficialModules", "SAM_FIXTURES", "VNET_FIXTURES", "RTOL", "ATOL", "sam_config", "sam_kwargs",
           "build_sam", "build_vnet", "sam_inputs", "randomize_", "make_sam_fixture", "make_vnet_fixture", "rerun_sam",
           "rerun_vnet", "compare_tensors",
           "compare_values", "sam_manifest", "vnet_manifest", "state_dict_listing", "md5_file"]

RTOL, ATOL = 1e-4, 1e-5          # the fixtures' suggested tolerance (README section 4)
FORMAT_VERSION = 1
SAM_DESCRIPTION = ("Golden I/O of the official SAM-Med3D 3D modules (ImageEncoderViT3D, PromptEncoder3D, "
                   "MaskDecoder3D with its hard-coded TwoWayTransformer3D) as vendored in SemiSAM "
                   "code/segment_anything, small config, all parameters/buffers re-randomised.")
VNET_DESCRIPTION = ("Golden I/O of the official UA-MT/SemiSAM VNet (code/networks/vnet.py) in eval mode, all "
                    "params/buffers re-randomised.")
GENERATOR = "code/make_golden_fixtures.py (imports the official modules unmodified)"
SAM_PATHS = "code/segment_anything/modeling/{image_encoder3D,prompt_encoder3D,mask_decoder3D,sam3D}.py"
VNET_PATH = "code/networks/vnet.py"
CASES = ("points_and_mask", "points_only", "mask_only")
VNET_TAPS = ("block_three", "block_four", "block_five", "block_six", "block_seven")


@dataclass(frozen=True)
class OfficialModules:
    """The model classes the recipe builds: the official ones, or a reimplementation with the same constructor
    keyword arguments and state-dict names."""
    ImageEncoderViT3D: type
    PromptEncoder3D: type
    MaskDecoder3D: type
    Sam3D: type
    VNet: type


# ------------------------------------------------------------------------------------------ configs (README 2, 3)
def sam_config(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
               window_size: int, global_attn_indexes: list, mask_in_chans: int, num_multimask_outputs: int,
               iou_head_depth: int, iou_head_hidden_dim: int, dim: int = 48) -> dict:
    """A config in the fixtures' plain-Python format (``fx['config']``)."""
    grid = img_size // patch_size
    return {
        "image_encoder": {"img_size": img_size, "patch_size": patch_size, "in_chans": 1, "embed_dim": embed_dim,
                          "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio, "out_chans": dim,
                          "qkv_bias": True, "norm_layer": {"type": "LayerNorm", "eps": 1e-6}, "act_layer": "GELU",
                          "use_abs_pos": True, "use_rel_pos": True, "rel_pos_zero_init": True,
                          "window_size": window_size, "global_attn_indexes": list(global_attn_indexes)},
        "prompt_encoder": {"embed_dim": dim, "image_embedding_size": [grid] * 3, "input_image_size": [img_size] * 3,
                           "mask_in_chans": mask_in_chans, "activation": "GELU"},
        "mask_decoder": {"transformer_dim": dim, "num_multimask_outputs": num_multimask_outputs,
                         "iou_head_depth": iou_head_depth, "iou_head_hidden_dim": iou_head_hidden_dim,
                         "activation": "GELU"},
        "hard_coded": {"mask_decoder_transformer": {"cls": "TwoWayTransformer3D", "depth": 2, "embedding_dim": dim,
                                                    "mlp_dim": 2048, "num_heads": 8, "activation": "ReLU",
                                                    "attention_downsample_rate": 2}},
    }


# seed: constructor torch.manual_seed; seed + 1: re-randomisation generator; seed + 2: inputs generator
SAM_FIXTURES = {
    "a": dict(seed=1234, n_points=3, float_points=False, upscaling_tap=True,
              config=sam_config(32, 8, 32, 2, 2, 4.0, 6, [1], 8, 3, 3, 16)),
    "b": dict(seed=98765, n_points=5, float_points=True, upscaling_tap=False,
              config=sam_config(24, 4, 48, 3, 3, 2.0, 4, [2], 4, 2, 2, 24)),
}
VNET_FIXTURES = {
    "a": dict(seed=4242, shape=(1, 1, 32, 32, 32),
              config=dict(n_channels=1, n_classes=2, n_filters=4, normalization="batchnorm", has_dropout=True)),
    "b": dict(seed=777, shape=(1, 1, 48, 32, 16),
              config=dict(n_channels=1, n_classes=2, n_filters=4, normalization="instancenorm", has_dropout=False)),
}


def sam_kwargs(config: Mapping[str, Any]) -> dict:
    """Constructor keyword arguments of the three sub-modules from a fixture config (README 2, "config")."""
    acts = {"GELU": nn.GELU, "ReLU": nn.ReLU}
    ie, pe, md = (dict(config[k]) for k in ("image_encoder", "prompt_encoder", "mask_decoder"))
    norm = ie["norm_layer"]
    if norm["type"] != "LayerNorm":
        raise ValueError(f"unsupported norm_layer {norm!r}")
    ie["norm_layer"] = partial(nn.LayerNorm, eps=norm["eps"])
    ie["act_layer"] = acts[ie["act_layer"]]
    pe["activation"], md["activation"] = acts[pe["activation"]], acts[md["activation"]]
    pe["image_embedding_size"] = tuple(pe["image_embedding_size"])
    pe["input_image_size"] = tuple(pe["input_image_size"])
    return {"image_encoder": ie, "prompt_encoder": pe, "mask_decoder": md}


def build_sam(classes: OfficialModules, config: Mapping[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    kw = sam_kwargs(config)
    return classes.Sam3D(image_encoder=classes.ImageEncoderViT3D(**kw["image_encoder"]),
                         prompt_encoder=classes.PromptEncoder3D(**kw["prompt_encoder"]),
                         mask_decoder=classes.MaskDecoder3D(**kw["mask_decoder"]))


def build_vnet(classes: OfficialModules, config: Mapping[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return classes.VNet(**config)


# --------------------------------------------------------------------------------------- re-randomisation
_LINEAR_OR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every state-dict entry, in state-dict order, from one ``torch.Generator(seed)`` (README 2):
    Linear / Conv weights ``randn / sqrt(fan_in)`` (ConvTranspose: fan_in = in_channels), biases ``0.1 randn``,
    norm weights ``1 + 0.1 randn``, BatchNorm running mean ``0.1 randn``, running var ``0.5 + rand``,
    ``num_batches_tracked`` ``randint(1, 1000)``, ``positional_encoding_gaussian_matrix`` ``randn``, embeddings,
    ``pos_embed`` and ``rel_pos_*`` ``0.5 randn``. The class name ``LayerNorm3d`` counts as a norm (the official
    code defines it in several files). Any other entry raises ValueError naming it."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    new = OrderedDict()
    for key, value in model.state_dict().items():
        mod_name, _, name = key.rpartition(".")
        mod = modules[mod_name]

        def randn(scale: float = 1.0, shift: Optional[float] = None) -> torch.Tensor:
            t = torch.randn(value.shape, generator=g)
            t = t if scale == 1.0 else scale * t
            return t if shift is None else shift + t
        if isinstance(mod, _NORMS) or type(mod).__name__ == "LayerNorm3d":
            if name == "weight":
                new[key] = randn(0.1, 1.0)
            elif name in ("bias", "running_mean"):
                new[key] = randn(0.1)
            elif name == "running_var":
                new[key] = 0.5 + torch.rand(value.shape, generator=g)
            elif name == "num_batches_tracked":
                new[key] = torch.randint(1, 1000, value.shape, generator=g)
            else:
                raise ValueError(f"re-randomisation has no rule for {key}")
        elif isinstance(mod, _LINEAR_OR_CONV + _TRANSPOSED) and name == "weight":
            fan_in = mod.in_channels if isinstance(mod, _TRANSPOSED) else value[0].numel()
            new[key] = torch.randn(value.shape, generator=g) / math.sqrt(fan_in)
        elif name == "bias":
            new[key] = randn(0.1)
        elif name == "positional_encoding_gaussian_matrix":
            new[key] = randn()
        elif (isinstance(mod, nn.Embedding) and name == "weight") or name == "pos_embed" or name.startswith("rel_pos"):
            new[key] = randn(0.5)
        else:
            raise ValueError(f"re-randomisation has no rule for {key} ({type(mod).__name__})")
    model.load_state_dict(new, strict=True)
    return model


# ------------------------------------------------------------------------------------------- inputs, calls
def sam_inputs(config: Mapping[str, Any], seed: int, n_points: int, float_points: bool) -> "OrderedDict":
    """image, point_coords, point_labels, mask_input, in this order from ``torch.Generator(seed)``."""
    g = torch.Generator().manual_seed(seed)
    img = config["image_encoder"]["img_size"]
    grid = config["prompt_encoder"]["image_embedding_size"][0]
    image = torch.randn(1, 1, img, img, img, generator=g)
    if float_points:
        coords = torch.rand(1, n_points, 3, generator=g) * (img - 1)
    else:
        coords = torch.randint(0, img, (1, n_points, 3), generator=g)
    labels = torch.randint(0, 2, (1, n_points), generator=g)
    labels[0, 0], labels[0, 1] = 1, 0
    mask = 2 * torch.randn(1, 1, 4 * grid, 4 * grid, 4 * grid, generator=g)
    return OrderedDict(image=image, point_coords=coords, point_labels=labels, mask_input=mask)


class _Taps:
    """Forward hooks storing detached contiguous copies of module outputs; ``mask_decoder.transformer.queries``
    and ``.keys`` are the two outputs of the transformer."""

    def __init__(self, model: nn.Module, names):
        self.store, self._handles = OrderedDict(), []
        for name in names:
            part = None
            if name.startswith("mask_decoder.transformer."):
                part = {"queries": 0, "keys": 1}[name.rsplit(".", 1)[1]]
                name_mod = "mask_decoder.transformer"
            else:
                name_mod = name
            self.store[name] = None
            self._handles.append(model.get_submodule(name_mod).register_forward_hook(
                lambda _m, _i, out, name=name, part=part: self._keep(name, out if part is None else out[part])))

    def _keep(self, name, out):
        if self.store[name] is None:    # the first call only
            self.store[name] = out.detach().clone().contiguous()

    def close(self) -> "OrderedDict":
        for h in self._handles:
            h.remove()
        missing = [k for k, v in self.store.items() if v is None]
        if missing:
            raise RuntimeError(f"forward hooks never fired for {missing}")
        return self.store


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous()


@torch.no_grad()
def run_sam(model: nn.Module, inputs: Mapping[str, torch.Tensor], upscaling_tap: bool) -> tuple:
    """The calls of README 2 ("Calls") in eval mode: (outputs, intermediates)."""
    model.eval()
    enc = model.image_encoder
    dec_names = (["mask_decoder.output_upscaling"] if upscaling_tap else []) + \
        ["mask_decoder.transformer.queries", "mask_decoder.transformer.keys"]
    taps = _Taps(model, ["image_encoder.patch_embed"] + [f"image_encoder.blocks.{i}" for i in range(len(enc.blocks))]
                 + dec_names)
    try:
        emb = enc(inputs["image"])
        pe = model.prompt_encoder.get_dense_pe()
        outputs = OrderedDict(image_embeddings=_c(emb), image_pe=_c(pe))
        points = [inputs["point_coords"], inputs["point_labels"]]
        prompts = {"points_and_mask": (points, inputs["mask_input"]), "points_only": (points, None),
                   "mask_only": (None, inputs["mask_input"])}
        for case in CASES:
            pts, masks = prompts[case]
            sparse, dense = model.prompt_encoder(points=pts, boxes=None, masks=masks)
            call = dict(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense)
            low, iou = model.mask_decoder(**call, multimask_output=False)
            res = OrderedDict(sparse_embeddings=_c(sparse), dense_embeddings=_c(dense), low_res_masks=_c(low),
                              iou_pred=_c(iou))
            if case == "points_and_mask":
                low_mm, iou_mm = model.mask_decoder(**call, multimask_output=True)
                res.update(low_res_masks_multimask=_c(low_mm), iou_pred_multimask=_c(iou_mm))
            outputs[case] = res
    finally:
        intermediates = taps.close()
    return outputs, intermediates


@torch.no_grad()
def run_vnet(net: nn.Module, x: torch.Tensor) -> tuple:
    """``net.eval(); net(x)`` under no_grad: (logits, the low-resolution blocks' outputs)."""
    net.eval()
    taps = _Taps(net, VNET_TAPS)
    try:
        out = _c(net(x))
    finally:
        intermediates = taps.close()
    return out, intermediates


# ------------------------------------------------------------------------------------------- the files
def _meta(seeds: dict, sources: Mapping[str, str], extra: Optional[dict] = None) -> "OrderedDict":
    # the device as torch names it (a fresh string: pickled as a literal, not as a back-reference to the
    # storages' 'cpu', so the bytes equal those of the shared fixtures)
    meta = OrderedDict(torch_version=str(torch.__version__), dtype="float32", device=str(torch.device("cpu")))
    meta.update(extra or {})
    meta.update(seeds=seeds, official_sources=dict(sources), generator=GENERATOR)
    return meta


def make_sam_fixture(classes: OfficialModules, which: str, sources: Mapping[str, str]) -> "OrderedDict":
    """The content of ``sam3d_golden_<which>.pt``. ``sources``: the ``meta['official_sources']`` entries
    (semisam_commit, semisam_path, sam_med3d_commit)."""
    spec = SAM_FIXTURES[which]
    seed, config = spec["seed"], spec["config"]
    model = randomize_(build_sam(classes, config, seed), seed + 1).eval()
    inputs = sam_inputs(config, seed + 2, spec["n_points"], spec["float_points"])
    outputs, intermediates = run_sam(model, inputs, spec["upscaling_tap"])
    seeds = {"constructor_manual_seed": seed, "randomize_generator_seed": seed + 1, "inputs_generator_seed": seed + 2}
    return OrderedDict(format_version=FORMAT_VERSION, description=SAM_DESCRIPTION, config=config,
                       state_dict=OrderedDict((k, _c(v)) for k, v in model.state_dict().items()),
                       inputs=inputs, outputs=outputs, intermediates=intermediates, meta=_meta(seeds, sources))


def make_vnet_fixture(classes: OfficialModules, which: str, sources: Mapping[str, str]) -> "OrderedDict":
    """The content of ``vnet_golden_<which>.pt``. ``sources``: uamt_commit, semisam_commit, path."""
    spec = VNET_FIXTURES[which]
    seed, config = spec["seed"], spec["config"]
    net = randomize_(build_vnet(classes, config, seed), seed + 1).eval()
    x = torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(seed + 2))
    out, intermediates = run_vnet(net, x)
    seeds = {"constructor_manual_seed": seed, "randomize_generator_seed": seed + 1, "input_generator_seed": seed + 2}
    return OrderedDict(format_version=FORMAT_VERSION, description=VNET_DESCRIPTION, config=dict(config),
                       state_dict=OrderedDict((k, _c(v)) for k, v in net.state_dict().items()), input=x, output=out,
                       intermediates=intermediates, meta=_meta(seeds, sources, {"mode": "eval"}))


def rerun_sam(classes: OfficialModules, fx: Mapping[str, Any], seed: int = 0) -> "OrderedDict":
    """README 4's check: fresh modules from ``fx['config']`` (constructor seeded with ``seed``, on purpose not the
    fixture's), strict load of its state_dict, the calls again: {'outputs', 'intermediates'}."""
    model = build_sam(classes, fx["config"], seed)
    model.load_state_dict(fx["state_dict"], strict=True)
    upscaling = "mask_decoder.output_upscaling" in fx["intermediates"]
    outputs, intermediates = run_sam(model, fx["inputs"], upscaling)
    return OrderedDict(outputs=outputs, intermediates=intermediates)


def rerun_vnet(classes: OfficialModules, fx: Mapping[str, Any], seed: int = 0) -> "OrderedDict":
    net = build_vnet(classes, fx["config"], seed)
    net.load_state_dict(fx["state_dict"], strict=True)
    out, intermediates = run_vnet(net, fx["input"])
    return OrderedDict(output=out, intermediates=intermediates)


# ------------------------------------------------------------------------------------------- comparison
def _leaves(obj: Any, prefix: str = "") -> dict:
    """{'a/b/c': leaf} of nested mappings (state_dict keys keep their dots)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}/" if isinstance(v, Mapping) else f"{prefix}{k}"))
        return out
    return {prefix: obj}


def compare_tensors(new: Mapping[str, Any], ref: Mapping[str, Any], rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Every tensor of ``ref`` against ``new`` (the same key paths, dtypes and shapes). Returns {'tensors',
    'bit_exact', 'max_abs', 'worst', 'failures'}: a failure is a missing or extra tensor, another dtype or shape, or
    a value beyond ``|a - b| <= atol + rtol |b|``; integer tensors must be equal."""
    a = {k: v for k, v in _leaves(new).items() if torch.is_tensor(v)}
    b = {k: v for k, v in _leaves(ref).items() if torch.is_tensor(v)}
    failures = [f"{k}: only in the generated file" for k in a if k not in b]
    failures += [f"{k}: missing from the generated file" for k in b if k not in a]
    max_abs, worst, exact = 0.0, None, True
    for key in (k for k in b if k in a):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            failures.append(f"{key}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
            exact = False
            continue
        if torch.equal(x, y):
            continue
        exact = False
        if not (x.is_floating_point() or x.is_complex()):
            failures.append(f"{key}: integer values differ")
            continue
        diff = (x.double() - y.double()).abs()
        d = float(diff.max()) if diff.numel() else 0.0
        if d > max_abs:
            max_abs, worst = d, key
        if not torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True).all():
            failures.append(f"{key}: max abs diff {d:.3g} beyond rtol {rtol:g} / atol {atol:g}")
    return {"tensors": len(b), "bit_exact": exact and not failures, "max_abs": max_abs, "worst": worst,
            "failures": failures}


def compare_values(new: Mapping[str, Any], ref: Mapping[str, Any], notes_only: Callable[[str], bool]) -> tuple:
    """The non-tensor leaves: (failures, notes); a difference at a path for which ``notes_only(path)`` is true is a
    note (e.g. ``meta/generator``, a timing), any other a failure."""
    a = {k: v for k, v in _leaves(new).items() if not torch.is_tensor(v)}
    b = {k: v for k, v in _leaves(ref).items() if not torch.is_tensor(v)}
    failures, notes = [], []
    for key in list(b) + [k for k in a if k not in b]:
        x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
        if x != y:
            (notes if notes_only(key) else failures).append(f"{key}: {_short(x)} vs {_short(y)}")
    return failures, notes


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


# ------------------------------------------------------------------------------------------- manifests (README 1, 3)
def md5_file(path) -> str:
    return file_digest(path, "md5")


def state_dict_listing(model: nn.Module) -> list:
    """[{'name', 'shape', 'dtype', 'kind'}] in state-dict order (kind: parameter or buffer)."""
    params = dict(model.named_parameters())
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
             "kind": "parameter" if k in params else "buffer"} for k, v in model.state_dict().items()]


def _state_bytes(model: nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the manifest records what the official code raises
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    raise AssertionError("expected the official code to raise")


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


@torch.no_grad()
def sam_shapes(model: nn.Module) -> "OrderedDict":
    """README 1 ``shapes``: the full-size model's calls (random inputs; the image encoder is timed)."""
    g = torch.Generator().manual_seed(0)
    size = model.image_encoder.img_size
    low = 4 * model.prompt_encoder.image_embedding_size[0]
    mask = torch.randn(1, 1, low, low, low, generator=g)
    shapes = OrderedDict()
    t0 = time.perf_counter()
    emb = model.image_encoder(torch.randn(1, 1, size, size, size, generator=g))
    shapes[f"image_encoder(1,1,{size},{size},{size})"] = _shape(emb)
    shapes["_image_encoder_cpu_seconds"] = round(time.perf_counter() - t0, 1)
    pe = model.prompt_encoder.get_dense_pe()
    shapes["prompt_encoder.get_dense_pe()"] = _shape(pe)
    mask_txt = f"masks (1,1,{low},{low},{low})"
    for n in (1, 3):
        points = [torch.randint(0, size, (1, n, 3), generator=g), torch.ones(1, n, dtype=torch.int64)]
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask)
        shapes[f"prompt_encoder(points N={n}, {mask_txt}) sparse"] = _shape(sparse)
        shapes[f"prompt_encoder(points N={n}, {mask_txt}) dense"] = _shape(dense)
        s2, d2 = model.prompt_encoder(points=points, boxes=None, masks=None)
        shapes[f"prompt_encoder(points N={n}, masks=None) sparse"] = _shape(s2)
        shapes[f"prompt_encoder(points N={n}, masks=None) dense"] = _shape(d2)
        for multi in (False, True):
            m, iou = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=multi)
            shapes[f"mask_decoder(N={n}, multimask_output={multi}) low_res_masks"] = _shape(m)
            shapes[f"mask_decoder(N={n}, multimask_output={multi}) iou_pred"] = _shape(iou)
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=mask)
    shapes[f"prompt_encoder(points=None, {mask_txt}) sparse"] = _shape(sparse)
    shapes[f"prompt_encoder(points=None, {mask_txt}) dense"] = _shape(dense)
    m, iou = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=dense, multimask_output=False)
    shapes["mask_decoder(points=None) low_res_masks"] = _shape(m)
    shapes["mask_decoder(points=None) iou_pred"] = _shape(iou)
    image = torch.randn(1, size, size, size, generator=g)
    shapes["Sam3D.forward"] = "raises " + _error(
        lambda: model([{"image": image, "original_size": (size,) * 3}], multimask_output=False))
    return shapes


def _sam_hyperparameters(model: nn.Module) -> dict:
    """README 1 ``hyperparameters`` of the vit_b_ori builder; the per-block values are read off the model."""
    enc, pe, dec = model.image_encoder, model.prompt_encoder, model.mask_decoder
    grid = list(pe.image_embedding_size)
    dim = pe.embed_dim
    return {
        "builder": "SemiSAM code/segment_anything/build_sam3D.py::build_sam3D_vit_b_ori -> _build_sam3D_ori",
        "image_encoder": {
            "class": type(enc).__name__, "img_size": enc.img_size, "patch_size": 16, "in_chans": 1, "embed_dim": 768,
            "depth": len(enc.blocks), "num_heads": 12, "head_dim": 64, "mlp_ratio": 4, "mlp_hidden": 3072,
            "act": "nn.GELU (exact erf)", "norm_layer": "nn.LayerNorm(eps=1e-6)", "qkv_bias": True,
            "use_abs_pos": True, "use_rel_pos": True, "rel_pos_zero_init": True, "window_size": 14,
            "global_attn_indexes": [i for i, b in enumerate(enc.blocks) if b.window_size == 0],
            "window_size_per_block": [b.window_size for b in enc.blocks],
            "rel_pos_shape_per_block": [list(b.attn.rel_pos_d.shape) for b in enc.blocks],
            "token_grid": grid, "out_chans": dim,
            "neck": f"Conv3d(768,{dim},k1,bias=False) -> LayerNorm3d({dim},eps=1e-6) -> "
                    f"Conv3d({dim},{dim},k3,p1,bias=False) -> LayerNorm3d({dim},eps=1e-6)"},
        "prompt_encoder": {
            "class": type(pe).__name__, "embed_dim": dim, "image_embedding_size": grid,
            "input_image_size": list(pe.input_image_size), "mask_in_chans": 16, "activation": "nn.GELU",
            "pe_layer": f"PositionEmbeddingRandom3D(num_pos_feats={dim}//3={dim // 3}, scale=1.0)",
            "num_point_embeddings": pe.num_point_embeddings,
            "mask_downscaling": f"Conv3d(1,4,k2,s2) -> LayerNorm3d(4) -> GELU -> Conv3d(4,16,k2,s2) -> "
                                f"LayerNorm3d(16) -> GELU -> Conv3d(16,{dim},k1)"},
        "mask_decoder": {
            "class": type(dec).__name__, "transformer_dim": dim, "num_multimask_outputs": dec.num_multimask_outputs,
            "num_mask_tokens": dec.num_mask_tokens, "iou_head_depth": 3, "iou_head_hidden_dim": 256,
            "activation": "nn.GELU",
            "transformer (HARD-CODED inside MaskDecoder3D.__init__)":
                "TwoWayTransformer3D(depth=2, embedding_dim=transformer_dim, mlp_dim=2048, num_heads=8) with "
                "defaults activation=nn.ReLU, attention_downsample_rate=2",
            "output_upscaling": f"ConvTranspose3d({dim},{dim // 4},k2,s2) -> LayerNorm3d({dim // 4}) -> GELU -> "
                                f"ConvTranspose3d({dim // 4},{dim // 8},k2,s2) -> GELU",
            "output_hypernetworks_mlps": f"{dec.num_mask_tokens} x MLP({dim},{dim},{dim // 8},num_layers=3) "
                                         f"(ReLU between layers)",
            "iou_prediction_head": f"MLP({dim},256,{dec.num_mask_tokens},num_layers=3)"},
        "Sam3D": {
            "pixel_mean": [round(float(v), 3) for v in model.pixel_mean.flatten()],
            "pixel_std": [round(float(v), 3) for v in model.pixel_std.flatten()],
            "pixel_mean/std registered as non-persistent buffers (not in state_dict)": [
                k for k in ("pixel_mean", "pixel_std") if k in dict(model.named_buffers()) and k not in
                model.state_dict()],
            "used": "only in Sam3D.preprocess(), called only by Sam3D.forward(), which no SemiSAM/SAM-Med3D "
                    "training/inference path calls (they call image_encoder / prompt_encoder / mask_decoder directly)",
            "mask_threshold": model.mask_threshold},
    }


def sam_manifest(build_vit_b_ori: Callable[[], nn.Module], build_upstream: Callable[[], nn.Module],
                 semisam_commit: str) -> "OrderedDict":
    """``sam_med3d_vit_b_ori_state_dict.json``: the vit_b_ori model of ``build_vit_b_ori()`` (SemiSAM's builder,
    checkpoint None) listed, run at full size for ``shapes``, and compared (names, shapes, dtypes, order) with
    ``build_upstream()`` (SAM-Med3D main's builder)."""
    torch.manual_seed(0)
    model = build_vit_b_ori().eval()
    listing = state_dict_listing(model)
    with torch.device("meta"):
        upstream = state_dict_listing(build_upstream())
    params = {k: sum(p.numel() for p in getattr(model, k).parameters())
              for k in ("image_encoder", "prompt_encoder", "mask_decoder")}
    n_params = len(list(model.parameters()))
    return OrderedDict([
        ("source", f"SemiSAM (YichiZhang98/SemiSAM @ {semisam_commit[:7]}) code/segment_anything, "
                   f"sam_model_registry3D['vit_b_ori'](checkpoint=None)"),
        ("torch_version", str(torch.__version__)),
        ("total_parameters", sum(params.values())),
        ("total_parameters_by_module", params),
        ("num_state_dict_entries", len(listing)),
        ("num_parameters_tensors", n_params),
        ("num_persistent_buffers", len(listing) - n_params),
        ("state_dict_bytes_float32", _state_bytes(model)),
        ("identical_to_uni-medical_SAM-Med3D_main (names, shapes, dtypes, order)", listing == upstream),
        ("hyperparameters", _sam_hyperparameters(model)),
        ("shapes", sam_shapes(model)),
        ("state_dict", listing),
    ])


def vnet_manifest(vnet_cls: type, semisam_vnet_cls: type, files: Mapping[str, Any], uamt_commit: str) -> "OrderedDict":
    """``vnet_state_dict.json``: the full-size V-Net of UA-MT's ``vnet_cls`` listed and its input-size checks;
    ``files``: {'UA-MT code/networks/vnet.py': path, 'SemiSAM code/networks/vnet.py': path,
    'SemiSAM code_semisam+/networks/vnet.py': path} for the md5s; ``semisam_vnet_cls`` for the identity flag."""
    cfg = dict(n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=True)
    torch.manual_seed(0)
    net = vnet_cls(**cfg).eval()
    listing = state_dict_listing(net)
    md5 = {name: md5_file(path) for name, path in files.items()}
    uamt_key, semisam_key = "UA-MT code/networks/vnet.py", "SemiSAM code/networks/vnet.py"
    checks = OrderedDict()
    with torch.no_grad():
        for size in ((112, 112, 80), (128, 128, 128), (96, 96, 96), (40, 32, 32), (24, 32, 32)):
            shape = [1, 1, *size]
            try:
                checks[str(shape)] = f"ok -> {list(net(torch.zeros(shape)).shape)}"
            except Exception as err:  # noqa: BLE001 - recorded
                checks[str(shape)] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        small = vnet_cls(n_channels=1, n_classes=2, n_filters=2, normalization="instancenorm").eval()
        checks["instancenorm [1,1,16,16,16] (1x1x1 bottleneck)"] = _error(lambda: small(torch.zeros(1, 1, 16, 16, 16)))
    checks["groupnorm n_filters=8"] = _error(lambda: vnet_cls(n_filters=8, normalization="groupnorm"))
    n_params = len(list(net.parameters()))
    args = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    return OrderedDict([
        ("source", f"UA-MT (yulequan/UA-MT @ {uamt_commit}) code/networks/vnet.py :: VNet({args})"),
        ("torch_version", str(torch.__version__)),
        ("vnet_py_md5", md5),
        ("semisam_code_vnet_identical_to_uamt", md5[uamt_key] == md5[semisam_key]),
        ("semisam_state_dict_identical", listing == state_dict_listing(semisam_vnet_cls(**cfg))),
        ("total_parameters", sum(p.numel() for p in net.parameters())),
        ("num_state_dict_entries", len(listing)),
        ("num_parameters_tensors", n_params),
        ("num_buffers", len(listing) - n_params),
        ("state_dict_bytes", _state_bytes(net)),
        ("input_size_checks(eval, batchnorm, n_filters=16)", checks),
        ("state_dict", listing),
    ])
