"""Inkling (``inkling_mm_model``): 4-pixel patches of images scaled by 1/8 (the processor's
``rescale_image_frac``), 4 to 9 patches per image, a 4-layer patch encoder and a 4-expert,
top-2 text model with one shared expert; its image processor needs torchvision, so a layout
stand-in replaces it."""

from __future__ import annotations

from typing import Any

from pp_media.testing._stand_ins import InklingPatchLayout
from pp_media.testing._tiny import IMAGE_TOKEN, VISION_START, TinyFamily, alternating, tiny_family

#: The encoder plans one scale per prime factor of the patch and temporal sizes plus the input
#: (4 at patch 4); with fewer layers than scales it imports scipy, so 4 layers.
PATCH, ENCODER_LAYERS = 4, 4
RESCALE = 0.125


@tiny_family
class InklingFamily(TinyFamily):
    model_types = ("inkling_mm_model",)
    aliases = ("inkling",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        layers = text["num_hidden_layers"]
        moe = {
            **text,
            "head_dim": 16,
            "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 2,
            "swa_head_dim": 16,
            "sliding_window_size": 8,
            "rel_extent": 32,
            "d_rel": 4,
            "layer_types": alternating("hybrid_sliding", "hybrid", layers),
            "mlp_layer_types": ["sparse"] * layers,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            # The checkpoints' 24 makes a random model's logits (and every gradient) 24x smaller
            # than its peers'; 1.5 keeps them checkable and the division inexact in fp32.
            "logits_mup_width_multiplier": 1.5,
            # Inkling never ties its embeddings (separate ``embed``/``unembed`` checkpoints).
            "tie_word_embeddings": False,
        }
        vision = {"patch_size": PATCH, "temporal_patch_size": 2, "n_layers": ENCODER_LAYERS}
        return transformers.InklingConfig(
            text_config=moe,
            vision_config=vision,
            audio_config={"n_mel_bins": 8},
            image_token_id=IMAGE_TOKEN,
            image_bos_token_id=VISION_START,
            audio_token_id=989,
            audio_bos_token_id=988,
        )

    def processor(self, config: Any) -> Any:
        return InklingPatchLayout(config.vision_config.patch_size, rescale_image_frac=RESCALE)
