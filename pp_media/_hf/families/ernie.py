"""ERNIE-4.5-VL MoE: Qwen-VL-style flat patches and M-RoPE, plus modality-isolated experts.

Every MoE layer routes a token to the vision experts when its ``moe_mm_token_type_ids`` entry is
non-zero (image and video placeholders and their start/end tokens) and to the text experts
otherwise; without the field every token goes to the text experts, silently. So the field is a
``stage_fields`` entry that every stage gets for its own microbatch and hands its text model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pp_media._hf.families.base import MediaKind
from pp_media._hf.families.qwen_vl import IMAGES, VIDEOS, QwenVLAdapter
from pp_media._hf.families.registry import family

#: Per-token expert choice: 1 at image tokens, 2 at video tokens (with their start/end), else 0.
MOE_FIELD = "moe_mm_token_type_ids"
#: Config attributes of the tokens that enclose each kind's placeholder run.
_BOUNDS = {
    "image": ("image_start_token_id", "image_end_token_id"),
    "video": ("video_start_token_id", "video_end_token_id"),
}
_TYPES = {"image": 1, "video": 2}


@family
class Ernie4_5VLMoeAdapter(QwenVLAdapter):
    """Placeholders per image ``t*h*w // merge**2`` (``pixel_values [sum t*h*w, 3*14*14]``),
    per video also divided by ``temporal_merge_size``; position ids from its own
    ``get_rope_index``, sent from stage 0; ``moe_mm_token_type_ids`` to every stage."""

    model_types = ("ernie4_5_vl_moe",)
    vision_paths = ("model.vision_tower", "model.resampler_model")
    media = (IMAGES, VIDEOS)
    stage_fields = ("mm_token_type_ids", MOE_FIELD)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        tokens = super().tokens_per_item(config, kind, media)
        if kind.name == "video":
            return tokens // config.vision_config.temporal_merge_size
        return tokens

    def step_fields(
        self, config: Any, batch: Mapping[str, Any], has_media: bool
    ) -> dict[str, torch.Tensor]:
        fields = super().step_fields(config, batch, has_media)
        moe_types = batch.get(MOE_FIELD)
        fields[MOE_FIELD] = (
            moe_types if moe_types is not None else self.moe_token_type_ids(config, batch)
        )
        return fields

    def moe_token_type_ids(self, config: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """``moe_mm_token_type_ids`` as the processor builds them: ``mm_token_type_ids`` plus
        each kind's start and end tokens."""
        input_ids = batch["input_ids"]
        types = torch.zeros_like(input_ids, dtype=torch.int64)
        for kind in self.media:
            tokens = [self.token_id(config, kind)]
            tokens += [getattr(config, name) for name in _BOUNDS[kind.name]]
            for token in tokens:
                types.masked_fill_(input_ids == token, _TYPES[kind.name])
        return types

    def text_model_fields(self, fields: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        moe_types = fields.get(MOE_FIELD)
        return {} if moe_types is None else {MOE_FIELD: moe_types}

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        """The layer's ``MoeBlock`` (text and vision routers' logits in one ``[tokens, E]``
        tensor, output 1); None for the dense layers of ``mlp_layer_types``."""
        return (layer.mlp, 1) if hasattr(layer.mlp, "text_moe") else None
