"""InternVL: image tiles flat over the batch, ``[n_tiles, C, H, W]``, with ``num_patches``
counting the tiles of each image (not the Step3-style crops per sample of the seed API)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family

#: ``InternVLProcessor`` pops ``num_patches``; the collate puts it back for the tile split.
IMAGES = replace(base.IMAGES, requires=("num_patches",))

#: InternVL's tiles per image travel to the core as a ``[tiles, 1]`` grid: rows per item.
TILE_GRID = "image_grid_hws"


@family
class InternVLAdapter(FamilyAdapter):
    """Every tile gives ``(image_size // patch_size)**2 * downsample_ratio**2`` placeholders;
    several images per sample, each with its own tile count."""

    model_types = ("internvl",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)

    def core_layout(self, batch: dict[str, Any]) -> None:
        tiles = batch.pop("num_patches", None)
        if tiles is not None:
            tiles = tiles.to(torch.int64).reshape(-1, 1)
            batch[TILE_GRID] = torch.cat((tiles, torch.ones_like(tiles)), dim=1)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        vision = config.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (
            vision.image_size[1] // vision.patch_size[1]
        )
        per_tile = int(patches * config.downsample_ratio**2)
        if TILE_GRID not in media:
            layout = dict(media)
            self.core_layout(layout)
            media = layout
        return media[TILE_GRID][:, 0].to(torch.int64) * per_tile
