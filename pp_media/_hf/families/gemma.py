"""Gemma3 and PaliGemma: one row per image, out-of-vocabulary placeholders, and attention masks
built from ``token_type_ids`` that every stage rebuilds for its own microbatch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pp_media._hf.families.base import IMAGES, FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family


def _mask_arguments(
    config: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> dict[str, Any]:
    """What the base models pass to transformers' mask builders, for this stage's microbatch."""
    return {
        "config": config.get_text_config(),
        "inputs_embeds": hidden,
        "attention_mask": attention_mask,
        "cache": None,
        "position_ids": position_ids,
    }


def _rows(media: Mapping[str, torch.Tensor], per_row: int) -> torch.Tensor:
    return torch.full((media["pixel_values"].shape[0],), per_row, dtype=torch.int64)


@family
class Gemma3Adapter(FamilyAdapter):
    """``mm_tokens_per_image`` placeholders per row of ``pixel_values`` (images without
    pan-and-scan crops). Image blocks attend bidirectionally (``token_type_ids`` 1), in full
    and sliding layers alike: every stage builds those masks as ``Gemma3Model`` does."""

    model_types = ("gemma3",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)
    stage_fields = ("token_type_ids",)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return _rows(media, config.mm_tokens_per_image)

    def layer_mask(
        self,
        config: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
    ) -> Any:
        from transformers.models.gemma3 import modeling_gemma3 as gemma3

        mask_kwargs = _mask_arguments(config, hidden, attention_mask, position_ids)
        token_type_ids = fields.get("token_type_ids")
        if token_type_ids is None:
            return gemma3.create_masks_for_generate(**mask_kwargs)
        blocks = gemma3.get_block_sequence_ids_for_mask(token_type_ids, device=hidden.device)
        return gemma3.create_masks_for_vision_model(block_sequence_ids=blocks, **mask_kwargs)


@family
class PaliGemmaAdapter(FamilyAdapter):
    """``(image_size // patch_size)**2`` placeholders per image; positions start at 1 (sent
    from stage 0); the prefix (``token_type_ids`` 0) attends bidirectionally."""

    model_types = ("paligemma",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES,)
    stage_fields = ("token_type_ids",)
    sends_position_ids = True

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        vision = config.vision_config
        return _rows(media, (vision.image_size // vision.patch_size) ** 2)

    def position_ids(
        self,
        base_model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + 1

    def position_ids_shape(self, config: Any, batch: int, seq: int) -> tuple[int, ...]:
        return (1, seq)

    def layer_mask(
        self,
        config: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
    ) -> Any:
        from transformers.models.paligemma import modeling_paligemma as paligemma

        text_config = config.get_text_config()
        mask_kwargs = _mask_arguments(config, hidden, attention_mask, position_ids)
        token_type_ids = fields.get("token_type_ids")
        if token_type_ids is not None:
            mask_kwargs["block_sequence_ids"] = torch.where(token_type_ids == 0, 0, -1)
        causal = paligemma.create_causal_mask(**mask_kwargs)
        if getattr(text_config, "sliding_window", None) is None:
            return causal
        return {
            "full_attention": causal,
            "sliding_attention": paligemma.create_sliding_window_causal_mask(**mask_kwargs),
        }

    def final_logits(self, config: Any, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
