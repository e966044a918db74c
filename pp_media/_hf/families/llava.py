"""LLaVA (1.5): one ``[C, H, W]`` row per image, a fixed number of placeholders per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pp_media._hf.families.base import IMAGES, FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family


@family
class LlavaAdapter(FamilyAdapter):
    """Every image gives ``(image_size // patch_size)**2`` features (plus the CLS token with
    ``vision_feature_select_strategy="full"``); positions are the text model's own."""

    model_types = ("llava",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        vision = config.vision_config
        per_image = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "full":
            per_image += 1
        n_images = media[kind.pixel_field].shape[0]
        return torch.full((n_images,), per_image, dtype=torch.int64)
