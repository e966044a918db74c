"""Llama 4 (Scout, Maverick): image tiles ``[tiles, 3, S, S]``, pixel shuffle, a mixture-of-experts
text model with chunked-attention and no-RoPE layers, and no ``.model`` wrapper.

``Llama4ForConditionalGeneration`` holds ``vision_model``, ``multi_modal_projector`` and
``language_model`` (a ``Llama4ForCausalLM``: decoder ``language_model.model``, head
``language_model.lm_head``) directly. Its layers fix their attention kind and expert block at
construction from the global layer index (``no_rope_layers``, ``moe_layers``); at run time the
text model reads only ``layer_types`` (chunked or full attention) by its own enumeration, which
the stage's slice of the config keeps aligned with the layers it holds.

Images of any number of tiles (the image processor's default ``max_patches=16``): an image of an
``h x w`` grid has ``h * w`` tiles plus a global one (one tile alone when ``h * w == 1``), each a
row of ``pixel_values``. The vision model runs on every tile and the features are scattered in
tile order, so a microbatch whose pixel chunk holds exactly its samples' tiles, in order,
computes what the unsplit forward does. The layout counts each image's rows with
``n_tiles_per_image``, which a step derives (``rows_per_item``, ``llama4_tiles``) from
``aspect_ratios`` when a collate keeps it, else from the tokens between each image's start and
end tokens (the processor drops ``aspect_ratios``). A batch with neither (no image start tokens)
cannot tell an image's tiles apart: each row is then taken as an image of one tile, which still
gives each sample exactly its tiles (every tile has the same placeholders, scattered in order)
but counts tiles as images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.llama4_tiles import (
    ASPECT_RATIOS,
    TILES,
    ImageTokens,
    tiles_from_aspect_ratios,
    tiles_per_image,
)
from pp_media._hf.families.registry import family
from pp_media._layouts import ROW_IMAGES, CountRows, MediaLayout

IMAGES = replace(base.IMAGES, rows_field=TILES)
#: Images counted per sample, each ``n_tiles_per_image`` rows of ``pixel_values`` (one row per
#: image without it); the processor's ``aspect_ratios`` travel with their images.
LLAMA4_LAYOUT = MediaLayout(
    (replace(ROW_IMAGES, rows=CountRows(TILES), extras=(ASPECT_RATIOS,), label="Llama 4 tiles"),)
)


def tile_placeholders(config: Any) -> int:
    """Placeholders of one tile: ``(image_size // patch_size)**2 * pixel_shuffle_ratio**2``."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)


@family
class Llama4Adapter(FamilyAdapter):
    """Placeholders (``image_token_index``: the ``<|patch|>`` token) per image: its tiles times
    ``(image_size // patch_size)**2 * pixel_shuffle_ratio**2``; features: the vision model's
    pixel-shuffled output through the projector, as the unsplit forward computes them."""

    model_types = ("llama4",)
    vision_paths = ("vision_model", "multi_modal_projector")
    text_model_path = "language_model.model"
    base_model_path = ""
    head_path = "language_model.lm_head"
    media = (IMAGES,)
    media_layout = LLAMA4_LAYOUT

    def rows_per_item(
        self, config: Any, kind: MediaKind, batch: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Tiles per image from ``aspect_ratios`` (checked against the tokens) or from each
        image's placeholders between its ``boi`` / ``eoi`` tokens, divided by a tile's."""
        tokens = ImageTokens(
            batch["input_ids"],
            self.token_id(config, kind),
            int(config.boi_token_index),
            int(config.eoi_token_index),
            tile_placeholders(config),
        )
        return tiles_per_image(tokens, batch.get(ASPECT_RATIOS), batch[kind.pixel_field])

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        tiles = media.get(TILES)
        if tiles is None and media.get(ASPECT_RATIOS) is not None:
            tiles = tiles_from_aspect_ratios(media[ASPECT_RATIOS])
        if tiles is None:  # one row per image
            tiles = torch.ones(media[kind.pixel_field].shape[0], dtype=torch.int64)
        return tiles.to(torch.int64) * tile_placeholders(config)

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What ``Llama4ForConditionalGeneration.forward`` scatters into the placeholders: the
        vision model's last hidden state over every tile, flattened, through
        ``multi_modal_projector``."""
        hidden = base_model.vision_model(media[kind.pixel_field]).last_hidden_state
        return base_model.multi_modal_projector(hidden.reshape(-1, hidden.shape[-1])), []
