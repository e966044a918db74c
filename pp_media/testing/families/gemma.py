"""Gemma3 and PaliGemma: SigLIP on 56x56 images, one row per image, ``token_type_ids``."""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    TinyFamily,
    alternating,
    pil_processor,
    small_vision,
    tiny_family,
)

#: 56x56 images, 16 patches (pooled to 4 tokens in Gemma3).
IMAGE_SIZE = 56


def _siglip() -> dict[str, Any]:
    return small_vision(model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=14)


def _tokens(tie_word_embeddings: bool) -> dict[str, Any]:
    return {"image_token_id": IMAGE_TOKEN, "tie_word_embeddings": tie_word_embeddings}


@tiny_family
class Gemma3Family(TinyFamily):
    """Sliding and full layers alternating; ``token_type_ids`` 1 at the image tokens."""

    model_types = ("gemma3",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        layer_types = alternating("sliding_attention", "full_attention", text["num_hidden_layers"])
        gemma = {**text, "head_dim": 16, "sliding_window": 16, "layer_types": layer_types}
        return transformers.Gemma3Config(
            vision_config=_siglip(),
            text_config={**gemma, "model_type": "gemma3_text"},
            mm_tokens_per_image=4,
            boi_token_index=VISION_START,
            eoi_token_index=VISION_END,
            **_tokens(tie_word_embeddings),
        )

    def processor(self, config: Any) -> Any:
        size = config.vision_config.image_size
        return pil_processor("Gemma3ImageProcessor")(size={"height": size, "width": size})

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        batch["token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()

    def make_checkable(self, model: Any, seed: int) -> None:
        """The projector weight starts at zero, which makes every vision-tower gradient zero."""
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight.copy_(0.02 * torch.randn(weight.shape, generator=generator))


@tiny_family
class PaliGemmaFamily(TinyFamily):
    """``PaliGemmaProcessor(suffix=...)``: the image-and-prompt prefix (token type 0) carries no
    labels and attends bidirectionally; the suffix (type 1) is the trained answer."""

    model_types = ("paligemma",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        return transformers.PaliGemmaConfig(
            vision_config=_siglip(),
            text_config={**text, "head_dim": 16, "model_type": "gemma"},
            projection_dim=64,
            **_tokens(tie_word_embeddings),
        )

    def processor(self, config: Any) -> Any:
        size = config.vision_config.image_size
        return pil_processor("SiglipImageProcessor")(size={"height": size, "width": size})

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        attention_mask = batch["attention_mask"]
        positions = torch.arange(attention_mask.shape[1]).expand(attention_mask.shape[0], -1)
        prefix = torch.tensor(prefix_lengths).unsqueeze(1)
        suffix = (positions >= prefix) & (attention_mask == 1)
        batch["labels"] = batch["labels"].masked_fill(~suffix, -100)
        batch["token_type_ids"] = suffix.long()
