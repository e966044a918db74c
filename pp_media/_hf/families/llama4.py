"""Llama 4 (Scout, Maverick): image tiles ``[tiles, 3, S, S]``, pixel shuffle, a mixture-of-experts
text model with chunked-attention and no-RoPE layers, and no ``.model`` wrapper.

``Llama4ForConditionalGeneration`` holds ``vision_model``, ``multi_modal_projector`` and
``language_model`` (a ``Llama4ForCausalLM``: decoder ``language_model.model``, head
``language_model.lm_head``) directly. Its layers fix their attention kind and expert block at
construction from the global layer index (``no_rope_layers``, ``moe_layers``); at run time the
text model reads only ``layer_types`` (chunked or full attention) by its own enumeration, which
the stage's slice of the config keeps aligned with the layers it holds.

Only single-tile images: the image processor splits a larger image into ``h x w`` tiles plus a
global one (``h * w + 1`` rows of ``pixel_values`` for an image, ``aspect_ratios [h, w]``), and
the processor drops ``aspect_ratios``, so the rows of an image are no field of the batch; with
``max_patches=1`` every image is one tile, one row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family
from pp_media._layouts import ROW_IMAGES, MediaLayout

#: The image processor's per-image ``aspect_ratios`` (tiles down and across) travel with their
#: image rows when a collate keeps them.
ASPECT_RATIOS = "aspect_ratios"
LLAMA4_LAYOUT = MediaLayout((replace(ROW_IMAGES, extras=(ASPECT_RATIOS,)),))


@family
class Llama4Adapter(FamilyAdapter):
    """Placeholders (``image_token_index``: the ``<|patch|>`` token) per tile:
    ``(image_size // patch_size)**2 * pixel_shuffle_ratio**2``; features: the vision model's
    pixel-shuffled output through the projector, as the unsplit forward computes them."""

    model_types = ("llama4",)
    vision_paths = ("vision_model", "multi_modal_projector")
    text_model_path = "language_model.model"
    base_model_path = ""
    head_path = "language_model.lm_head"
    media = (base.IMAGES,)
    media_layout = LLAMA4_LAYOUT

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        ratios = media.get(ASPECT_RATIOS)
        if ratios is not None and bool((ratios.prod(-1) != 1).any()):
            raise ValueError(
                f"pp_media: llama4 images of several tiles (aspect_ratios "
                f"{ratios.tolist()}) are not supported: an image's rows of pixel_values "
                "(h * w tiles plus a global one) are not a field of the batch. Process the "
                "images with the image processor's max_patches=1 (one tile per image)."
            )
        vision = config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2
        tiles = media[kind.pixel_field].shape[0]
        return torch.full((tiles,), int(per_tile), dtype=torch.int64)

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What ``Llama4ForConditionalGeneration.forward`` scatters into the placeholders: the
        vision model's last hidden state, flattened, through ``multi_modal_projector``."""
        hidden = base_model.vision_model(media[kind.pixel_field]).last_hidden_state
        return base_model.multi_modal_projector(hidden.reshape(-1, hidden.shape[-1])), []
