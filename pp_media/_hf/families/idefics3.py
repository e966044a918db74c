"""Idefics3 and SmolVLM: pixels laid out per sample, ``[B, max_crops, C, H, W]`` padded with
all-zero crops, and ``pixel_attention_mask`` travelling with them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family

IMAGES = replace(base.IMAGES, feature_fields=("pixel_attention_mask",), rows_per_sample=True)


def _real_crops(pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, max_crops]``: which crops are real (the model drops crops that are all zeros)."""
    return ~(pixel_values == 0).flatten(2).all(-1)


@family
class Idefics3Adapter(FamilyAdapter):
    """Every real crop (a tile, or the global image) gives ``image_seq_len`` placeholders:
    ``(image_size // patch_size)**2 / scale_factor**2``. A microbatch of text-only samples
    carries only zero crops and skips the vision model, as the unsplit model would."""

    model_types = ("idefics3", "smolvlm")
    vision_paths = ("model.vision_model", "model.connector")
    text_model_path = "model.text_model"
    media = (IMAGES,)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        vision = config.vision_config
        per_crop = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        return _real_crops(media[kind.pixel_field]).sum(-1).to(torch.int64) * per_crop

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        if not bool(_real_crops(media[kind.pixel_field]).any()):
            return None
        return super().features(base_model, kind, media)
