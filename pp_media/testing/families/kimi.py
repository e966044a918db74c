"""Kimi-K2.5: flat ``[n, 3, 14, 14]`` patches with ``image_grid_thw``, a DeepSeek-V3 MoE text
model; its image processor needs torchvision, so a layout stand-in replaces it."""

from __future__ import annotations

from typing import Any

from pp_media.testing._stand_ins import FlatPatchLayout
from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    TinyFamily,
    small_vision,
    tiny_family,
)


@tiny_family
class KimiK25Family(TinyFamily):
    model_types = ("kimi_k25",)
    video_layout = "patches"

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        deepseek = {
            **text,
            "model_type": "deepseek_v3",
            "num_key_value_heads": 4,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        }
        return transformers.Kimi_K25Config(
            vision_config=small_vision(pos_emb_height=16, pos_emb_width=16),
            text_config=deepseek,
            video_token_id=VIDEO_TOKEN,
            projection_hidden_size=32,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            image_token_id=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        return FlatPatchLayout(config.vision_config.patch_size)
