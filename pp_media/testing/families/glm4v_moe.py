"""GLM-4.5V (``glm4v_moe``): GLM-4V's layout, a dense first decoder layer, then MoE layers that
route on ``sigmoid(logits) + e_score_correction_bias`` (4 experts, top-2, one shared expert)."""

from __future__ import annotations

from typing import Any

from pp_media.testing._moe import (
    EXPERT_WIDTH,
    EXPERTS,
    ROUTER_AUX_LOSS_COEF,
    TOP_K,
    perturb_routing_biases,
)
from pp_media.testing._tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, tiny_family
from pp_media.testing.families.qwen_vl import _MROPE, GLM4V_VISION, Glm4vFamily


@tiny_family
class Glm4vMoeFamily(Glm4vFamily):
    """Images or videos in one forward, not both (as GLM-4V)."""

    model_types = ("glm4v_moe",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        rope = {**_MROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
        text = {
            **text,
            "rope_parameters": rope,
            "n_routed_experts": EXPERTS,
            "n_shared_experts": 1,
            "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": EXPERT_WIDTH,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        }
        return transformers.Glm4vMoeConfig(
            text_config=text,
            vision_config=GLM4V_VISION,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            image_start_token_id=VISION_START,
            image_end_token_id=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )

    def make_checkable(self, model: Any, seed: int) -> None:
        perturb_routing_biases(model, seed)
