"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4V: flat patches, M-RoPE, real processors."""

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
    pil_processor,
    tiny_family,
)

_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
#: Qwen3-VL and Qwen3.5: 16-pixel patches, learned position embeddings.
_VISION_3 = {
    **_VISION,
    "patch_size": 16,
    "hidden_size": 32,
    "intermediate_size": 64,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,
}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0}
#: GLM-4V and GLM-4.5V: a 2-layer vision tower of width 32, 14-pixel patches.
GLM4V_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "out_hidden_size": 64,
    "intermediate_size": 64,
    "image_size": 56,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _tokens(tie_word_embeddings: bool) -> dict[str, Any]:
    return {
        "image_token_id": IMAGE_TOKEN,
        "tie_word_embeddings": tie_word_embeddings,
        "video_token_id": VIDEO_TOKEN,
        "projection_hidden_size": 32,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
    }


@tiny_family
class QwenVLFamily(TinyFamily):
    """Qwen2-VL and Qwen2.5-VL; the processor emits ``mm_token_type_ids``."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    video_layout = "patches"

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        text = {**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
        if model_type == "qwen2_vl":
            vision = {**_VISION, "embed_dim": 32, "mlp_ratio": 2}
            return transformers.Qwen2VLConfig(
                text_config=text, vision_config=vision, **_tokens(tie_word_embeddings)
            )
        vision = {
            **_VISION,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        return transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, **_tokens(tie_word_embeddings)
        )

    def processor(self, config: Any) -> Any:
        vision = config.vision_config
        name = "Glm4vImageProcessor" if config.model_type == "glm4v" else "Qwen2VLImageProcessor"
        return pil_processor(name)(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        from pp_media._hf.families import adapter_for

        adapter = adapter_for(config)
        batch["mm_token_type_ids"] = adapter.token_type_ids(config, batch["input_ids"])


@tiny_family
class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL: deepstack features added after decoder layers 0, 1 and 2."""

    model_types = ("qwen3_vl",)
    video_frames_separately = True

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        vision = {**_VISION_3, "depth": 3, "deepstack_visual_indexes": [0, 1, 2]}
        rope = {**_MROPE, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text = {**text, "head_dim": 16, "rope_parameters": rope}
        return transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, **_tokens(tie_word_embeddings)
        )


@tiny_family
class Qwen3_5Family(QwenVLFamily):
    """Qwen3.5: decoder layers alternating linear attention and full attention."""

    model_types = ("qwen3_5",)
    video_frames_separately = True

    def hybrid_text_config(self, text: dict[str, Any]) -> dict[str, Any]:
        """The tiny text config: linear / full attention alternating, interleaved M-RoPE."""
        rope = {
            **_MROPE,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2],
            "mrope_interleaved": True,
        }
        layer_types = alternating("linear_attention", "full_attention", text["num_hidden_layers"])
        return {
            **text,
            "head_dim": 16,
            "layer_types": layer_types,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "rope_parameters": rope,
        }

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        return transformers.Qwen3_5Config(
            text_config=self.hybrid_text_config(text),
            vision_config=_VISION_3,
            **_tokens(tie_word_embeddings),
        )


@tiny_family
class Glm4vFamily(QwenVLFamily):
    """GLM-4V: its placeholder runs between image start / end tokens; images or videos in one
    forward, not both (a limit of the unsplit model)."""

    model_types = ("glm4v",)
    video_frames_separately = True
    mixes_images_and_videos = False

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        rope = {**_MROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
        return transformers.Glm4vConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config=GLM4V_VISION,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            image_start_token_id=VISION_START,
            image_end_token_id=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )


@tiny_family
class Qwen3VLMoeFamily(QwenVLFamily):
    """Qwen3-VL-MoE: 4 routed experts, top-k 2, every decoder layer sparse; deepstack after
    layers 0 and 1. ``router_aux_loss_coef`` 0.01 (10x the default) so that the router loss
    is well above the parity tolerances; ``output_router_logits`` stays transformers' default
    (off)."""

    model_types = ("qwen3_vl_moe",)
    video_frames_separately = True

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        vision = {**_VISION_3, "deepstack_visual_indexes": [0, 1]}
        rope = {**_MROPE, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text = {
            **text,
            "head_dim": 16,
            "rope_parameters": rope,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "router_aux_loss_coef": 0.01,
        }
        return transformers.Qwen3VLMoeConfig(
            text_config=text, vision_config=vision, **_tokens(tie_word_embeddings)
        )
