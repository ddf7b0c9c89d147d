"""Builders for SAM-Med3D models: a name registry and a plain-dict config format.

The config format is the golden fixtures' ``config`` entry (``sam3d_golden_*.pt['config']``), JSON-serialisable::

    {"name": "vit_b_ori",                      # optional, used in messages
     "image_encoder": {ImageEncoderViT3D kwargs; norm_layer {"type": "LayerNorm", "eps": 1e-6},
                       act_layer "GELU", global_attn_indexes a list},
     "prompt_encoder": {PromptEncoder3D kwargs; activation "GELU", sizes as lists},
     "mask_decoder": {MaskDecoder3D kwargs; activation "GELU"},
     "hard_coded": {...}}                      # optional record of MaskDecoder3D's fixed transformer

``sam3d_config(name)`` returns a registry entry in this format, so
``build_sam3d_from_config(json.loads(json.dumps(sam3d_config(name))))`` rebuilds the same model.

Registry:

* ``vit_b_ori``: the official ``_build_sam3D_ori`` (SemiSAM's generalist; sam_med3d.pth and
  sam_med3d_turbo.pth): img 128, patch 16, ViT-B (768, depth 12, 12 heads), window 14, global
  [2, 5, 8, 11], prompt dim 384, mask_in_chans 16, 3 multimask outputs, IoU head 3 x 256.
* ``vit_tiny_demo``: not an official model; a small random-weight stand-in for CPU demos and tests
  with the same geometry as vit_b_ori (8^3 token grid inside one zero-padded 14^3 window, global
  blocks, 4x mask prompt).
* ``vit_small_demo``: not an official model; the demo generalist's architecture (issue 20): img 64, patch 8
  (8^3 tokens), embed 128, depth 6, 4 heads, window 8 = the token grid (no zero-padded tokens, so every block
  attends over the whole cube at about half the cost of a padded 14^3 window), global [2, 5], prompt dim 96;
  2.66 M parameters, 5.3 MB in float16.

The official ``vit_b`` entry (img 256) is deliberately absent: its values could not be verified here.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Dict, Mapping

from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import (MaskDecoder3D, TRANSFORMER_ACTIVATION, TRANSFORMER_DEPTH, TRANSFORMER_DOWNSAMPLE,
                           TRANSFORMER_MLP_DIM, TRANSFORMER_NUM_HEADS)
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D

_ACTIVATIONS = {"GELU": nn.GELU, "ReLU": nn.ReLU}
_NORMS = {"LayerNorm": nn.LayerNorm}

_SECTION_KEYS = {
    "image_encoder": {"img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                      "out_chans", "qkv_bias", "norm_layer", "act_layer", "use_abs_pos", "use_rel_pos",
                      "rel_pos_zero_init", "window_size", "global_attn_indexes"},
    "prompt_encoder": {"embed_dim", "image_embedding_size", "input_image_size", "mask_in_chans", "activation"},
    "mask_decoder": {"transformer_dim", "num_multimask_outputs", "activation", "iou_head_depth",
                     "iou_head_hidden_dim"},
}
_REQUIRED_KEYS = {
    "image_encoder": {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "out_chans"},
    "prompt_encoder": {"embed_dim", "image_embedding_size", "input_image_size", "mask_in_chans"},
    "mask_decoder": {"transformer_dim"},
}
_TOP_KEYS = {"name", "image_encoder", "prompt_encoder", "mask_decoder", "hard_coded"}


def _make_config(name: str, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 window_size: int, global_attn_indexes: list, prompt_dim: int, mask_in_chans: int,
                 num_multimask_outputs: int, iou_head_depth: int, iou_head_hidden_dim: int) -> dict:
    grid = img_size // patch_size
    return {
        "name": name,
        "image_encoder": {
            "img_size": img_size, "patch_size": patch_size, "in_chans": 1, "embed_dim": embed_dim, "depth": depth,
            "num_heads": num_heads, "mlp_ratio": 4.0, "out_chans": prompt_dim, "qkv_bias": True,
            "norm_layer": {"type": "LayerNorm", "eps": 1e-6}, "act_layer": "GELU", "use_abs_pos": True,
            "use_rel_pos": True, "rel_pos_zero_init": True, "window_size": window_size,
            "global_attn_indexes": list(global_attn_indexes),
        },
        "prompt_encoder": {
            "embed_dim": prompt_dim, "image_embedding_size": [grid] * 3, "input_image_size": [img_size] * 3,
            "mask_in_chans": mask_in_chans, "activation": "GELU",
        },
        "mask_decoder": {
            "transformer_dim": prompt_dim, "num_multimask_outputs": num_multimask_outputs,
            "iou_head_depth": iou_head_depth, "iou_head_hidden_dim": iou_head_hidden_dim, "activation": "GELU",
        },
        "hard_coded": _hard_coded(prompt_dim),
    }


def _hard_coded(transformer_dim: int) -> dict:
    return {"mask_decoder_transformer": {
        "cls": "TwoWayTransformer3D", "depth": TRANSFORMER_DEPTH, "embedding_dim": transformer_dim,
        "mlp_dim": TRANSFORMER_MLP_DIM, "num_heads": TRANSFORMER_NUM_HEADS, "activation": TRANSFORMER_ACTIVATION,
        "attention_downsample_rate": TRANSFORMER_DOWNSAMPLE}}


_REGISTRY_CONFIGS: Dict[str, dict] = {
    "vit_b_ori": _make_config("vit_b_ori", img_size=128, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                              window_size=14, global_attn_indexes=[2, 5, 8, 11], prompt_dim=384, mask_in_chans=16,
                              num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256),
    "vit_tiny_demo": _make_config("vit_tiny_demo", img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                  window_size=14, global_attn_indexes=[1, 3], prompt_dim=96, mask_in_chans=16,
                                  num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64),
    "vit_small_demo": _make_config("vit_small_demo", img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4,
                                   window_size=8, global_attn_indexes=[2, 5], prompt_dim=96, mask_in_chans=16,
                                   num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64),
}


def registry_names() -> list[str]:
    """The registry's entry names, sorted (``checkpoint.sam_model_registry3D`` has a builder for each)."""
    return sorted(_REGISTRY_CONFIGS)


def sam3d_config(name: str) -> dict:
    """The config dict (fixture format, JSON-serialisable, a fresh copy) of registry entry ``name``."""
    if name not in _REGISTRY_CONFIGS:
        raise KeyError(f"unknown SAM-Med3D registry name {name!r}; known: {sorted(_REGISTRY_CONFIGS)}")
    return copy.deepcopy(_REGISTRY_CONFIGS[name])


def config_label(config: Mapping[str, Any]) -> str:
    """Short human-readable description of a config for messages."""
    try:
        ie = config["image_encoder"]
        dims = (f"img {ie['img_size']}, patch {ie['patch_size']}, embed {ie['embed_dim']}, depth {ie['depth']}, "
                f"prompt dim {config['prompt_encoder']['embed_dim']}")
    except (KeyError, TypeError):
        dims = "incomplete config"
    name = config.get("name") if isinstance(config, Mapping) else None
    return f"config {name!r} ({dims})" if name else f"config ({dims})"


def _fail(config: Mapping, msg: str) -> None:
    raise ValueError(f"invalid SAM-Med3D {config_label(config)}: {msg}")


def _layer(config: Mapping, where: str, value: Any, table: Dict[str, type]) -> type:
    if value not in table:
        _fail(config, f"{where}={value!r}; expected one of {sorted(table)}")
    return table[value]


def _translate(config: Mapping[str, Any]) -> Dict[str, dict]:
    """Validate ``config`` and turn it into constructor kwargs per sub-module."""
    if not isinstance(config, Mapping):
        raise ValueError(f"SAM-Med3D config must be a dict, got {type(config).__name__}")
    unknown = set(config) - _TOP_KEYS
    if unknown:
        _fail(config, f"unknown top-level keys {sorted(unknown)}; allowed {sorted(_TOP_KEYS)}")
    kwargs = {}
    for section, allowed in _SECTION_KEYS.items():
        sec = config.get(section)
        if not isinstance(sec, Mapping):
            _fail(config, f"missing or non-dict section {section!r}")
        bad = set(sec) - allowed
        if bad:
            _fail(config, f"unknown keys {sorted(bad)} in {section!r}; allowed {sorted(allowed)}")
        missing = _REQUIRED_KEYS[section] - set(sec)
        if missing:
            _fail(config, f"missing keys {sorted(missing)} in {section!r}")
        kwargs[section] = dict(sec)

    ie, pe, md = kwargs["image_encoder"], kwargs["prompt_encoder"], kwargs["mask_decoder"]
    if "norm_layer" in ie:
        norm = ie["norm_layer"]
        if not isinstance(norm, Mapping) or set(norm) != {"type", "eps"}:
            _fail(config, f"image_encoder.norm_layer must be {{'type': 'LayerNorm', 'eps': float}}, got {norm!r}")
        ie["norm_layer"] = partial(_layer(config, "image_encoder.norm_layer.type", norm["type"], _NORMS),
                                   eps=float(norm["eps"]))
    if "act_layer" in ie:
        ie["act_layer"] = _layer(config, "image_encoder.act_layer", ie["act_layer"], _ACTIVATIONS)
    for sec_name, sec in (("prompt_encoder", pe), ("mask_decoder", md)):
        if "activation" in sec:
            sec["activation"] = _layer(config, f"{sec_name}.activation", sec["activation"], _ACTIVATIONS)
    ie["global_attn_indexes"] = tuple(ie.get("global_attn_indexes", ()))
    pe["image_embedding_size"] = tuple(pe["image_embedding_size"])
    pe["input_image_size"] = tuple(pe["input_image_size"])

    img, patch = ie["img_size"], ie["patch_size"]
    if img % patch:
        _fail(config, f"image_encoder.img_size {img} is not a multiple of patch_size {patch}")
    if ie["embed_dim"] % ie["num_heads"]:
        _fail(config, f"image_encoder.embed_dim {ie['embed_dim']} is not divisible by num_heads {ie['num_heads']}")
    if not ie["out_chans"] == pe["embed_dim"] == md["transformer_dim"]:
        _fail(config, f"image_encoder.out_chans ({ie['out_chans']}), prompt_encoder.embed_dim ({pe['embed_dim']}) "
                      f"and mask_decoder.transformer_dim ({md['transformer_dim']}) must be equal")
    if pe["image_embedding_size"] != (img // patch,) * 3:
        _fail(config, f"prompt_encoder.image_embedding_size {list(pe['image_embedding_size'])} must be the "
                      f"token grid {[img // patch] * 3}")
    if pe["input_image_size"] != (img,) * 3:
        _fail(config, f"prompt_encoder.input_image_size {list(pe['input_image_size'])} must be {[img] * 3}")
    if pe["embed_dim"] % 3:
        _fail(config, f"prompt_encoder.embed_dim {pe['embed_dim']} must be divisible by 3")
    if md["transformer_dim"] % (TRANSFORMER_NUM_HEADS * TRANSFORMER_DOWNSAMPLE):
        _fail(config, f"mask_decoder.transformer_dim {md['transformer_dim']} must be divisible by 16")
    if pe["mask_in_chans"] % 4 or pe["mask_in_chans"] <= 0:
        _fail(config, f"prompt_encoder.mask_in_chans {pe['mask_in_chans']} must be a positive multiple of 4")
    if "hard_coded" in config and config["hard_coded"] != _hard_coded(md["transformer_dim"]):
        _fail(config, f"hard_coded {config['hard_coded']!r} differs from what MaskDecoder3D hard-codes: "
                      f"{_hard_coded(md['transformer_dim'])!r}")
    return kwargs


def build_sam3d_from_config(config: Mapping[str, Any]) -> Sam3D:
    """Build a randomly initialised :class:`Sam3D` (eval mode, like the official builders) from ``config``.

    Raises ``ValueError`` naming the offending key for an invalid config. ``model.config`` holds a copy
    of ``config``.
    """
    kwargs = _translate(config)
    model = Sam3D(image_encoder=ImageEncoderViT3D(**kwargs["image_encoder"]),
                  prompt_encoder=PromptEncoder3D(**kwargs["prompt_encoder"]),
                  mask_decoder=MaskDecoder3D(**kwargs["mask_decoder"]))
    model.config = copy.deepcopy(dict(config))
    return model.eval()
