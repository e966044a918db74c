"""Aria: ``AriaImageProcessorPil`` at its smallest size (490), a 70-pixel-patch Idefics3 tower
(49 patches, 4 projector queries per image) and a 4-expert, top-2 text model."""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, TinyFamily, pil_processor, small_vision, tiny_family

#: The processor accepts 490 or 980 only; a 70-pixel patch keeps the tower at 7x7 patches.
IMAGE_SIZE, PATCH = 490, 70
QUERIES = 4


class _AriaImages:
    """``AriaProcessor``'s image fields: the image processor's output without ``num_crops``
    (``AriaProcessor.unused_input_names``), which the model does not take."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, Any]:
        output = self.image_processor(images=images, return_tensors=return_tensors)
        return {name: value for name, value in output.items() if name != "num_crops"}


@tiny_family
class AriaFamily(TinyFamily):
    model_types = ("aria",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        moe = {
            **text,
            "head_dim": 16,
            "intermediate_size": 32,
            "moe_num_experts": 4,
            "moe_topk": 2,
            "moe_num_shared_experts": 1,
        }
        patches = (IMAGE_SIZE // PATCH) ** 2
        return transformers.AriaConfig(
            vision_config=small_vision(image_size=IMAGE_SIZE, patch_size=PATCH),
            text_config=moe,
            projector_patch_to_query_dict={patches: QUERIES},
            image_token_index=IMAGE_TOKEN,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        size = config.vision_config.image_size
        return _AriaImages(pil_processor("AriaImageProcessor")(max_image_size=size))
