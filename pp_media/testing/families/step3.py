"""Step3p7: one 112x112 global view per image (4 placeholders) plus 56x56 local crops (1 each),
a MoE text model; its image processor needs torchvision, so a layout stand-in replaces it."""

from __future__ import annotations

from typing import Any

from pp_media.testing._stand_ins import Step3Layout
from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, small_vision, tiny_family

#: Side of the global views.
GLOBAL_SIZE = 112


@tiny_family
class Step3p7Family(TinyFamily):
    model_types = ("step3p7",)
    #: The layout fixes one image per sample.
    images_per_sample = 1

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        num_layers = text["num_hidden_layers"]
        step3_text = {
            **text,
            "head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "share_expert_dim": 32,
            "mlp_layer_types": ["dense"] + ["sparse"] * (num_layers - 1),
            "layer_types": ["full_attention"] * num_layers,
            "num_sliding_attention_heads": 4,
            "sliding_window": 16,
        }
        return transformers.Step3p7Config(
            vision_config=small_vision(image_size=GLOBAL_SIZE, patch_size=14),
            text_config=step3_text,
            image_token_id=IMAGE_TOKEN,
        )

    def processor(self, config: Any) -> Any:
        return Step3Layout(config.vision_config.image_size)
