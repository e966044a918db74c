"""Aria: one ``[3, S, S]`` row of ``pixel_values`` per image (or per crop of a split image),
each with its ``pixel_mask [S, S]`` (True on the image, False on the processor's padding), and
a mixture-of-experts text model whose router adds no load-balancing loss in transformers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family
from pp_media._layouts import MediaGroup, MediaLayout

#: ``get_image_features`` masks the padded patches with ``pixel_mask`` (when given).
IMAGES = replace(base.IMAGES, feature_fields=("pixel_mask",))
#: One pixel row per item (an image, or a crop: a split image's crops are consecutive rows and
#: its placeholders one run of ``crops * queries``, so a crop counts as an item of its own),
#: ``pixel_mask`` one row per item beside it.
ROW_MASK_LAYOUT = MediaLayout(
    (MediaGroup("pixel_values", items="n_images_per_sample", per_item=("pixel_mask",)),)
)


def queries_per_row(config: Any, side: int) -> int:
    """Placeholders of one ``[3, side, side]`` row: the projector's learned queries for the
    vision tower's patch count, ``projector_patch_to_query_dict[(side / patch) ** 2]``."""
    patches = (side // config.vision_config.patch_size) ** 2
    table = config.projector_patch_to_query_dict
    if patches not in table:
        raise ValueError(
            f"pp_media: aria pixel_values rows of {side}x{side} pixels give {patches} patches, "
            f"but projector_patch_to_query_dict has {sorted(table)}; resize images to a side "
            "the config maps (the processor's max_image_size)."
        )
    return int(table[patches])


@family
class AriaAdapter(FamilyAdapter):
    """Idefics3 vision tower, cross-attention projector with learned queries, MoE decoder."""

    model_types = ("aria",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)
    media_layout = ROW_MASK_LAYOUT

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        pixels = media[kind.pixel_field]
        per_row = queries_per_row(config, pixels.shape[-1])
        return torch.full((pixels.shape[0],), per_row, dtype=torch.int64)
