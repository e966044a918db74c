"""Idefics3 and SmolVLM: per-sample pixel rows ``[B, max_images, C, H, W]``, no splitting."""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, pil_processor, small_vision, tiny_family


@tiny_family
class Idefics3Family(TinyFamily):
    model_types = ("idefics3", "smolvlm")
    #: The processor lays out rows per sample, so it needs the images grouped by sample.
    images_by_sample = True

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        config_class = (
            transformers.Idefics3Config if model_type == "idefics3" else transformers.SmolVLMConfig
        )
        return config_class(
            vision_config=small_vision(image_size=56, patch_size=14),
            text_config={**text, "model_type": "llama"},
            scale_factor=2,
            image_token_id=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        size = {"longest_edge": config.vision_config.image_size}
        name = (
            "Idefics3ImageProcessor" if config.model_type == "idefics3" else "SmolVLMImageProcessor"
        )
        return pil_processor(name)(do_image_splitting=False, size=size, max_image_size=size)
