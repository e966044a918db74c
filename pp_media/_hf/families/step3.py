"""Step3p7: one full (global) view per sample plus flat local crops, split by the seed API's
Step3 path: ``pixel_values [B, C, S, S]``, ``pixel_values_local`` as ``patch_pixel_values``,
``num_local_patches`` as ``num_patches`` (crops per sample), ``patch_newline_masks`` as
``patch_newline_mask``. Every sample carries exactly one image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind, _flat
from pp_media._hf.families.registry import family

IMAGES = replace(
    base.IMAGES,
    rows_per_sample=True,
    requires_with=(("pixel_values_local", "num_local_patches"),),
)
#: Step3p7's processor names and the seed's Step3 names the core splits.
_STEP3_NAMES = {
    "pixel_values_local": "patch_pixel_values",
    "num_local_patches": "num_patches",
    "patch_newline_masks": "patch_newline_mask",
}
#: Two stride-2 downsamplers after the patch embedding.
_DOWNSAMPLE = 4


def _tokens_per_view(pixels: torch.Tensor, patch_size: int) -> int:
    return (pixels.shape[-2] // patch_size // _DOWNSAMPLE) * (
        pixels.shape[-1] // patch_size // _DOWNSAMPLE
    )


@family
class Step3p7Adapter(FamilyAdapter):
    """Placeholders per sample: the global view's features, then each local crop's
    (``(side // patch // 4)**2`` each, from the tensors' own sizes)."""

    model_types = ("step3p7",)
    vision_paths = ("model.vision_model", "model.multi_modal_projector")
    media = (IMAGES,)

    def core_layout(self, batch: dict[str, Any]) -> None:
        for name, seed_name in _STEP3_NAMES.items():
            if name in batch:
                batch[seed_name] = batch.pop(name)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        layout = dict(media)
        self.core_layout(layout)
        patch = config.vision_config.patch_size
        views = layout["pixel_values"]
        tokens = torch.full((views.shape[0],), _tokens_per_view(views, patch), dtype=torch.int64)
        crops = layout.get("patch_pixel_values")
        if crops is not None and crops.shape[0]:
            tokens = tokens + layout["num_patches"].to(torch.int64) * _tokens_per_view(crops, patch)
        return tokens

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        crops = media.get("patch_pixel_values")
        counts = media.get("num_patches")
        output = base_model.get_image_features(
            media["pixel_values"],
            crops if crops is not None and crops.shape[0] else None,
            None if counts is None else counts.tolist(),
            return_dict=True,
        )
        return _flat(output.pooler_output), []
