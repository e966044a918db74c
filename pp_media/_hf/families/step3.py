"""Step3p7: one full (global) view per sample plus flat local crops, the seed API's Step3
layout under the processor's own names, described as data: ``pixel_values [B, C, S, S]``,
``pixel_values_local`` (crops), ``num_local_patches`` (crops per sample),
``patch_newline_masks`` (one per crop). Every sample carries exactly one image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind, _flat
from pp_media._hf.families.registry import family
from pp_media._layouts import STEP3_IMAGES, MediaLayout

IMAGES = replace(
    base.IMAGES,
    rows_per_sample=True,
    requires_with=(("pixel_values_local", "num_local_patches"),),
)
#: The seed's Step3 group under Step3p7's processor names.
STEP3P7_LAYOUT = MediaLayout(
    (
        replace(
            STEP3_IMAGES,
            items="num_local_patches",
            per_item=("pixel_values_local", "patch_newline_masks"),
            item_pixels=("pixel_values_local",),
            when=(),
        ),
    )
)
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
    media_layout = STEP3P7_LAYOUT

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        patch = config.vision_config.patch_size
        views = media["pixel_values"]
        tokens = torch.full((views.shape[0],), _tokens_per_view(views, patch), dtype=torch.int64)
        crops = media.get("pixel_values_local")
        if crops is not None and crops.shape[0]:
            tokens = tokens + media["num_local_patches"].to(torch.int64) * _tokens_per_view(
                crops, patch
            )
        return tokens

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        crops = media.get("pixel_values_local")
        counts = media.get("num_local_patches")
        output = base_model.get_image_features(
            media["pixel_values"],
            crops if crops is not None and crops.shape[0] else None,
            None if counts is None else counts.tolist(),
            return_dict=True,
        )
        return _flat(output.pooler_output), []
