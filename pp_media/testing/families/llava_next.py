"""Tiny LLaVA-NeXT and LLaVA-OneVision configs and their real image processors, offline.

Both families cut each image into ``image_size`` crops on the best of ``image_grid_pinpoints``
(anyres) plus one resized base crop, so the processor's crop size, the vision tower's
``image_size`` and the pinpoints must agree. Here: 56x56 crops of 14-pixel patches (16 patches
per crop) and pinpoints of 1x1, 1x2, 2x1 and 2x2 crops, which the synthetic image sizes
(56..112 pixels a side) spread over. LLaVA-NeXT uses a CLIP tower (a CLS token, dropped by the
``"default"`` feature strategy), LLaVA-OneVision a SigLIP one (no CLS, ``"full"``) with
``vision_aspect_ratio="anyres_max_1"``, so that images of more than one crop take the model's
bilinear down-sampling path (the checkpoints' ``anyres_max_9`` only does for 10+ crops).
"""

from __future__ import annotations

from typing import Any

from pp_media.testing._tiny import IMAGE_TOKEN, VIDEO_TOKEN, TinyFamily, pil_processor, tiny_family

#: Crop size of both processors and ``image_size`` of both vision towers.
CROP_SIZE = 56
PATCH_SIZE = 14
#: (height, width) of the anyres grids the processors may choose.
GRID_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _vision(model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": CROP_SIZE,
        "patch_size": PATCH_SIZE,
    }


def _common(tie_word_embeddings: bool) -> dict[str, Any]:
    return {
        "image_token_id": IMAGE_TOKEN,
        "image_grid_pinpoints": GRID_PINPOINTS,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _sizes(config: Any) -> tuple[int, list[list[int]]]:
    """The crop size and the pinpoints of ``config``, as the processors take them."""
    return config.vision_config.image_size, [list(p) for p in config.image_grid_pinpoints]


@tiny_family
class LlavaNextFamily(TinyFamily):
    model_types = ("llava_next",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        return transformers.LlavaNextConfig(
            vision_config=_vision("clip_vision_model"),
            text_config={**text, "model_type": "llama"},
            **_common(tie_word_embeddings),
        )

    def processor(self, config: Any) -> Any:
        size, pinpoints = _sizes(config)
        return pil_processor("LlavaNextImageProcessor")(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=pinpoints,
        )


@tiny_family
class LlavaOnevisionFamily(TinyFamily):
    """Its processor takes the images grouped by sample (a list per sample): only then does it
    know which images share a sample, its ``batch_num_images``. Videos: one
    ``[frames, C, H, W]`` row each, as its video processor emits them."""

    model_types = ("llava_onevision",)
    images_by_sample = True
    video_layout = "rows"

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        return transformers.LlavaOnevisionConfig(
            vision_config={**_vision("siglip_vision_model"), "vision_use_head": False},
            text_config={**text, "model_type": "qwen2"},
            video_token_id=VIDEO_TOKEN,
            vision_aspect_ratio="anyres_max_1",
            **_common(tie_word_embeddings),
        )

    def processor(self, config: Any) -> Any:
        size, pinpoints = _sizes(config)
        return pil_processor("LlavaOnevisionImageProcessor")(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        )
