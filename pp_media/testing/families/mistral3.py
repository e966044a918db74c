"""Mistral3: a Pixtral tower on images up to 112 pixels a side, rows padded to the largest."""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, pil_processor, small_vision, tiny_family


@tiny_family
class Mistral3Family(TinyFamily):
    model_types = ("mistral3",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        vision = small_vision(model_type="pixtral", image_size=112, patch_size=14, head_dim=16)
        return transformers.Mistral3Config(
            vision_config=vision,
            text_config={**text, "model_type": "mistral", "head_dim": 16},
            spatial_merge_size=2,
            projector_hidden_act="gelu",
            image_token_id=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        vision = config.vision_config
        return pil_processor("PixtralImageProcessor")(
            patch_size=vision.patch_size * config.spatial_merge_size,
            size={"longest_edge": vision.image_size},
        )
