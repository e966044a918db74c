"""Inkling (``inkling_mm_model``): image patches ``[patches, 2, p, p, 3]`` flat over the batch
with ``num_patches`` per image, one placeholder per patch (after an ``image_bos`` token); the
vision encoder's last layer projects straight to the text width (no projector). A
mixture-of-experts text model whose router adds no load-balancing loss in transformers; audio
(``audio_input_ids``) is not taken."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family
from pp_media._layouts import CountRows, MediaGroup, MediaLayout

#: ``InklingProcessor`` pops ``num_patches``; the collate puts it back for the patch split.
IMAGES = replace(base.IMAGES, requires=("num_patches",))
#: Images counted per sample, each ``num_patches`` rows of ``pixel_values``.
PATCH_LAYOUT = MediaLayout(
    (MediaGroup("pixel_values", items="n_images_per_sample", rows=CountRows("num_patches")),)
)


@family
class InklingAdapter(FamilyAdapter):
    """Every patch is one feature; the head reads the final hidden states divided by
    ``logits_mup_width_multiplier`` and keeps the first ``unpadded_vocab_size`` logits."""

    model_types = ("inkling_mm_model",)
    #: The audio tower stays with stage 0 (unused: no audio field is split).
    vision_paths = ("model.vision_tower", "model.audio_tower")
    media = (IMAGES,)
    media_layout = PATCH_LAYOUT

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return media["num_patches"].to(torch.int64)

    def head_input(self, config: Any, hidden: torch.Tensor) -> torch.Tensor:
        return hidden / config.get_text_config().logits_mup_width_multiplier

    def final_logits(self, config: Any, logits: torch.Tensor) -> torch.Tensor:
        unpadded = config.get_text_config().unpadded_vocab_size
        if unpadded is not None and unpadded < logits.shape[-1]:
            return logits[..., :unpadded]
        return logits
