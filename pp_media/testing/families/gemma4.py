"""Gemma4: per-layer inputs, keys and values shared across layers, variable-size images.

The tiny text model keeps what makes Gemma4 hard to pipeline: every layer takes a per-layer
input (``hidden_size_per_layer_input``), the second half of the layers reuse the keys and values
of the last earlier layer of their type (``num_kv_shared_layers``), and full-attention layers
have their own head size (``global_head_dim``, so ``per_layer_config`` differs by layer). Images
go through the real ``Gemma4ImageProcessorPil`` at its smallest budget (70 soft tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    TinyFamily,
    alternating,
    small_vision,
    tiny_family,
)

#: Pixels per patch side; the processor resizes each image to at most 70 pooled soft tokens.
PATCH = 4
POOLING = 2
SOFT_TOKENS = 70


class _Gemma4ImageFields:
    """``Gemma4ImageProcessorPil`` as ``Gemma4Processor`` uses it: the processor drops
    ``num_soft_tokens_per_image`` (its ``unused_input_names``), which only expands the prompt's
    placeholders, so a collated batch holds ``pixel_values`` and ``image_position_ids``."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        fields = dict(self.processor(images=images, return_tensors=return_tensors))
        fields.pop("num_soft_tokens_per_image", None)
        return fields


@tiny_family
class Gemma4Family(TinyFamily):
    """Sliding and full layers alternating, the last half sharing keys and values; image blocks
    attend bidirectionally in sliding layers (``use_bidirectional_attention="vision"`` with
    ``mm_token_type_ids``). The MoE block is off, as in the Gemma4 checkpoints with per-layer
    inputs and shared keys and values (E2B, E4B)."""

    model_types = ("gemma4",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        layers = text["num_hidden_layers"]
        gemma4 = {
            **text,
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 16,
            "layer_types": alternating("sliding_attention", "full_attention", layers),
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": text["vocab_size"],
            "num_kv_shared_layers": layers // 2,
            "use_bidirectional_attention": "vision",
            "final_logit_softcapping": 30.0,
        }
        vision = small_vision(
            num_key_value_heads=2,
            head_dim=16,
            patch_size=PATCH,
            pooling_kernel_size=POOLING,
            position_embedding_size=64,
        )
        return transformers.Gemma4Config(
            text_config=gemma4,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            boi_token_id=VISION_START,
            eoi_token_id=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        import transformers

        vision = config.vision_config
        return _Gemma4ImageFields(
            transformers.Gemma4ImageProcessorPil(
                patch_size=vision.patch_size,
                pooling_kernel_size=vision.pooling_kernel_size,
                max_soft_tokens=SOFT_TOKENS,
            )
        )

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        """``mm_token_type_ids`` as ``Gemma4Processor`` emits them: 1 at image placeholders."""
        batch["mm_token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
