"""InternVL: image tiles flat over the batch, ``[n_tiles, C, H, W]``, with ``num_patches``
counting the tiles of each image (not the Step3-style crops per sample of the seed API): a
layout of its own, described as data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family
from pp_media._layouts import CountRows, MediaGroup, MediaLayout

#: ``InternVLProcessor`` pops ``num_patches``; the collate puts it back for the tile split.
IMAGES = replace(base.IMAGES, requires=("num_patches",))
#: Images counted per sample, each ``num_patches`` tiles (rows of ``pixel_values``).
TILE_LAYOUT = MediaLayout(
    (MediaGroup("pixel_values", items="n_images_per_sample", rows=CountRows("num_patches")),)
)


@family
class InternVLAdapter(FamilyAdapter):
    """Every tile gives ``(image_size // patch_size)**2 * downsample_ratio**2`` placeholders;
    several images per sample, each with its own tile count."""

    model_types = ("internvl",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)
    media_layout = TILE_LAYOUT

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        vision = config.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (
            vision.image_size[1] // vision.patch_size[1]
        )
        per_tile = int(patches * config.downsample_ratio**2)
        return media["num_patches"].to(torch.int64) * per_tile
