"""SAM-Med3D (the SemiSAM "generalist"), reimplemented module by module after the official code.

State-dict names, shapes and order equal the official ``Sam3D`` so ``sam_med3d.pth`` /
``sam_med3d_turbo.pth`` load strictly. See ``image_encoder`` for the attention implementations
(``set_attention_impl``) and ``checkpoint`` for loading frozen generalists.
"""
from .build import build_sam3d_from_config, sam3d_config
from .checkpoint import (CKPT_DIR, arch_to_config, GeneralistCheckpointError, GeneralistCheckpointNotFoundError,
                         clear_generalist_cache, load_generalist, random_generalist,
                         sam_model_registry3D)
from .common import LayerNorm3d, MLPBlock, set_attention_impl
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PositionEmbeddingRandom3D, PromptEncoder3D
from .sam3d import Sam3D
from .transformer import TwoWayTransformer3D

__all__ = [
    "CKPT_DIR", "GeneralistCheckpointError", "GeneralistCheckpointNotFoundError", "ImageEncoderViT3D",
    "LayerNorm3d", "MLPBlock", "MaskDecoder3D", "PositionEmbeddingRandom3D", "PromptEncoder3D", "Sam3D",
    "TwoWayTransformer3D", "arch_to_config", "build_sam3d_from_config", "clear_generalist_cache", "load_generalist",
    "random_generalist", "sam3d_config", "sam_model_registry3D", "set_attention_impl",
]
