"""ERNIE-4.5-VL MoE: flat 14-pixel patches (no temporal patch), M-RoPE, text and vision experts."""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._moe import ROUTER_AUX_LOSS_COEF, perturb_routing_biases
from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    TinyFamily,
    pil_processor,
    tiny_family,
)

#: Start and end tokens around a video's placeholders (an image's are VISION_START / _END).
VIDEO_START, VIDEO_END = 994, 995
#: 4 routed experts (top-2) per modality and one shared expert; layer 0 dense, as the
#: checkpoints' ``mlp_layer_types`` start.
_MOE = {
    "moe_num_experts": 4,
    "moe_k": 2,
    "moe_intermediate_size": [32, 16],
    "moe_num_shared_experts": 1,
    "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
}
_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_merge_size": 2,
}


@tiny_family
class Ernie4_5VLMoeFamily(TinyFamily):
    """Images through the real PIL image processor; the processor's ``mm_token_type_ids``
    (placeholders) and ``moe_mm_token_type_ids`` (placeholders and their start/end tokens)."""

    model_types = ("ernie4_5_vl_moe",)
    #: Flat 14-pixel patch rows, frames merged in pairs by the resampler.
    video_layout = "patches"
    video_separators = ("video_start_token_id", "video_end_token_id")

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        layers = text["num_hidden_layers"]
        text = {
            **text,
            **_MOE,
            "head_dim": 16,
            "mlp_layer_types": ["dense"] + ["sparse"] * (layers - 1),
            # Height and width sections must be equal (the rotary embedding interleaves them).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [3, 3, 2],
            },
        }
        return transformers.Ernie4_5_VLMoeConfig(
            text_config=text,
            vision_config=_VISION,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            image_start_token_id=VISION_START,
            image_end_token_id=VISION_END,
            video_start_token_id=VIDEO_START,
            video_end_token_id=VIDEO_END,
            tie_word_embeddings=tie_word_embeddings,
        )

    def make_checkable(self, model: Any, seed: int) -> None:
        perturb_routing_biases(model, seed)

    def processor(self, config: Any) -> Any:
        vision = config.vision_config
        return pil_processor("Ernie4_5_VLMoeImageProcessor")(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size
        )

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        from pp_media._hf.families import adapter_for

        adapter = adapter_for(config)
        batch["mm_token_type_ids"] = adapter.token_type_ids(config, batch["input_ids"])
        batch["moe_mm_token_type_ids"] = adapter.moe_token_type_ids(config, batch)
