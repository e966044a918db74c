"""LLaVA: a CLIP tower on 56x56 images, 16 placeholders per image."""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, pil_processor, small_vision, tiny_family

#: The tiny vision tower sees 56x56 images: (56 // 14)**2 = 16 placeholders per image.
IMAGE_SIZE = 56


@tiny_family
class LlavaFamily(TinyFamily):
    model_types = ("llava",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        vision = small_vision(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=14)
        return transformers.LlavaConfig(
            vision_config=vision,
            text_config={**text, "model_type": "llama"},
            image_token_id=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        size = config.vision_config.image_size
        return pil_processor("CLIPImageProcessor")(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
