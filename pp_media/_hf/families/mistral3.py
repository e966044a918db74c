"""Mistral3 (Pixtral vision): one row per image padded to the batch's largest, true sizes in
``image_sizes``; one placeholder per merged patch of the true size."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family

IMAGES = replace(base.IMAGES, feature_fields=("image_sizes",), requires=("image_sizes",))


@family
class Mistral3Adapter(FamilyAdapter):
    """Placeholders per image: ``(h // (patch * merge)) * (w // (patch * merge))`` of its
    ``image_sizes`` row (the processor's ``[IMG_BREAK]`` / ``[IMG_END]`` tokens are text)."""

    model_types = ("mistral3",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        ratio = config.vision_config.patch_size * config.spatial_merge_size
        return (media["image_sizes"].to(torch.int64) // ratio).prod(-1)
