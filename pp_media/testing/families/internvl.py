"""InternVL: 56x56 tiles, 1 to 3 per image (``num_patches``)."""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, pil_processor, small_vision, tiny_family


@tiny_family
class InternVLFamily(TinyFamily):
    model_types = ("internvl",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        return transformers.InternVLConfig(
            vision_config=small_vision(image_size=[56, 56], patch_size=[14, 14]),
            text_config={**text, "model_type": "qwen2"},
            downsample_ratio=0.5,
            image_token_id=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        height, width = config.vision_config.image_size
        return pil_processor("GotOcr2ImageProcessor")(
            size={"height": height, "width": width},
            crop_to_patches=True,
            min_patches=1,
            max_patches=3,
        )
