"""Qwen2-VL, Qwen2.5-VL and GLM-4V: flat patches, one ``[t, h, w]`` grid row per item, M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family

IMAGES = replace(base.IMAGES, feature_fields=("image_grid_thw",), requires=("image_grid_thw",))
VIDEOS = replace(base.VIDEOS, feature_fields=("video_grid_thw",), requires=("video_grid_thw",))
_GRID = {"image": "image_grid_thw", "video": "video_grid_thw"}
_ROPE_FIELDS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
#: Value of ``mm_token_type_ids`` at each kind's placeholders (0 elsewhere).
_TOKEN_TYPES = {"image": 1, "video": 2}


@family
class QwenVLAdapter(FamilyAdapter):
    """Placeholders per item: ``t*h*w // merge**2``. Position ids ``[3, B, T]`` from
    ``get_rope_index``, computed per microbatch on stage 0 (it works sample by sample) and sent
    to every later stage with the hidden states. ``get_rope_index`` needs the batch's
    ``mm_token_type_ids`` (derived from the placeholders when a collate leaves them out)."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_paths = ("model.visual",)
    media = (IMAGES, VIDEOS)
    sends_position_ids = True
    stage_fields = ("mm_token_type_ids",)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        merge = config.vision_config.spatial_merge_size
        return media[_GRID[kind.name]].to(torch.int64).prod(-1) // merge**2

    def position_ids(
        self,
        base_model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        mm_token_type_ids = fields.get("mm_token_type_ids")
        if mm_token_type_ids is None:
            # What the text model does itself when the batch has no media.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            return positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1).contiguous()
        grids = {name: media[name] for name in _ROPE_FIELDS if name in media}
        position_ids, _ = base_model.get_rope_index(
            input_ids, mm_token_type_ids, attention_mask=attention_mask, **grids
        )
        return position_ids

    def step_fields(
        self, config: Any, batch: Mapping[str, Any], has_media: bool
    ) -> dict[str, torch.Tensor]:
        if not has_media:
            return {}  # the unsplit model computes M-RoPE positions only for batches with media
        types = batch.get("mm_token_type_ids")
        if types is None:
            types = self.token_type_ids(config, batch["input_ids"])
        return {"mm_token_type_ids": types}

    def token_type_ids(self, config: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids`` from the placeholders, for collates that do not emit them."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        for kind in self.media:
            types.masked_fill_(input_ids == self.token_id(config, kind), _TOKEN_TYPES[kind.name])
        return types


@family
class Glm4vAdapter(QwenVLAdapter):
    """GLM-4V: Qwen-VL's layout and placeholder rule with its own ``get_rope_index``. Its
    placeholder runs sit between ``image_start_token_id`` / ``image_end_token_id``. Like the
    unsplit model in transformers, it takes images or videos in one forward, not both."""

    model_types = ("glm4v",)


@family
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen-VL's layout (patch 16) plus deepstack: the vision tower's intermediate
    features are added, at the media positions, to the outputs of the first decoder layers
    (one per ``deepstack_visual_indexes`` entry). Stage 0 sends them on densely until the stage
    holding the last such layer; each stage hands the text model its own layers' share."""

    model_types = ("qwen3_vl",)

    def layer_feature_count(self, config: Any) -> int:
        return len(config.vision_config.deepstack_visual_indexes)

    def layer_features(self, output: Any) -> list[Any]:
        return list(output.deepstack_features or [])

    def text_model_kwargs(
        self, visual_mask: torch.Tensor, layer_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        positions = visual_mask.bool()
        return {
            "visual_pos_masks": positions,
            "deepstack_visual_embeds": [dense[positions] for dense in layer_features],
        }


@family
class Qwen3_5Adapter(QwenVLAdapter):
    """Qwen3.5: Qwen3-VL's vision layout and frame-separated videos without deepstack; its
    decoder mixes linear-attention and full-attention layers (``layer_types``), which the
    stage's own slice of the config keeps apart."""

    model_types = ("qwen3_5",)
