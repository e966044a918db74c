"""Kimi-K2.5: flat ``[n_patches, C, 14, 14]`` patches with ``image_grid_thw`` (videos alike);
a 2x2 merge kernel gives one placeholder per four patches of each frame."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.qwen_vl import _GRID, IMAGES, VIDEOS
from pp_media._hf.families.registry import family


@family
class KimiK25Adapter(FamilyAdapter):
    """Placeholders per item: ``h * w // (merge_kernel_h * merge_kernel_w)`` (the model's own
    split of its features); positions are the text model's own."""

    model_types = ("kimi_k25",)
    vision_paths = ("model.vision_tower", "model.mm_projector")
    media = (IMAGES, VIDEOS)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        kernel_h, kernel_w = config.vision_config.merge_kernel_size
        grid = media[_GRID[kind.name]].to(torch.int64)
        return grid[:, 1:].prod(-1) // (kernel_h * kernel_w)
