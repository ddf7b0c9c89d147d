"""The SAM-Med3D container (official ``Sam3D``): image encoder, prompt encoder, mask decoder.

SemiSAM and SAM-Med3D call the three sub-modules directly; so does this project. The official
``Sam3D.forward`` cannot run on 1-channel volumes (3-channel pixel_mean broadcast, "bilinear" on 5-D
tensors) and is not reproduced; :meth:`Sam3D.forward` here is a convenience that chains the sub-modules
the way SemiSAM does. ``pixel_mean`` / ``pixel_std`` are kept as non-persistent buffers (not in the
state dict, unused) so module and state-dict layout match the official class.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Container with sub-modules ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    Attributes:
        img_size: the encoder's input size S (volumes are ``(B, 1, S, S, S)``).
        config: the plain-dict config it was built from (see ``build.sam3d_config``), or None.
    """

    mask_threshold: float = 0.0
    image_format: str = "L"

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D, pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375)) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(-1, 1, 1), False)
        self.img_size: int = int(image_encoder.img_size)
        self.config: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def forward(self, image: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                masks: Optional[torch.Tensor] = None,
                multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode ``image (B, 1, S, S, S)``, embed the prompts, decode.

        Args:
            points: ``(coords (B, N, 3), labels (B, N))`` or None; masks: ``(B, 1, 4g, 4g, 4g)`` or None.
        Returns:
            low_res_masks ``(B, 1 or M, 4g, 4g, 4g)`` logits and iou_pred ``(B, 1 or M)``.
        """
        image_embeddings = self.image_encoder(image)
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=masks)
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output)
