"""Qwen3.5 MoE: Qwen3.5's vision layout and mixed linear / full attention, with every decoder
layer a sparse MoE block (4 experts, top-2, a sigmoid-gated shared expert)."""

from __future__ import annotations

from typing import Any

from pp_media.testing._moe import EXPERT_WIDTH, EXPERTS, ROUTER_AUX_LOSS_COEF, TOP_K
from pp_media.testing._tiny import tiny_family
from pp_media.testing.families.qwen_vl import _VISION_3, Qwen3_5Family, _tokens


@tiny_family
class Qwen3_5MoeFamily(Qwen3_5Family):
    model_types = ("qwen3_5_moe",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        text = {
            **self.hybrid_text_config(text),
            "num_experts": EXPERTS,
            "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": EXPERT_WIDTH,
            "shared_expert_intermediate_size": EXPERT_WIDTH,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        }
        return transformers.Qwen3_5MoeConfig(
            text_config=text, vision_config=_VISION_3, **_tokens(tie_word_embeddings)
        )
