"""Tiny random-weight configs of each supported family, for the demo and the tests.

Sizes are small enough that 20 training steps on 2 CPU processes take seconds, and consistent
with the family's real image processor as constructed by ``image_processor``.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 990, 991, 992, 993
VOCAB = 1000
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
#: LLaVA's tiny vision tower sees 56x56 images: (56 // 14)**2 = 16 placeholders per image.
LLAVA_IMAGE_SIZE = 56
#: Step3p7: 112x112 global views (4 placeholders), 56x56 local crops (1 placeholder each).
STEP3_GLOBAL_SIZE = 112
#: Gemma3 and PaliGemma (SigLIP): 56x56 images, 16 patches, pooled to 4 tokens in Gemma3.
SIGLIP_IMAGE_SIZE = 56


def _small_vision(**extra: Any) -> dict[str, Any]:
    """A 2-layer vision tower of width 32, plus the family's own fields."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **extra,
    }


def tiny_model_types() -> tuple[str, ...]:
    return (
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_5",
        "glm4v",
        "llava",
        "mistral3",
        "gemma3",
        "paligemma",
        "llava_next",
        "llava_onevision",
        "idefics3",
        "smolvlm",
        "internvl",
        "kimi_k25",
        "step3p7",
    )


def tiny_config(model_type: str, *, num_layers: int = 4, tie_word_embeddings: bool = False) -> Any:
    """A small config of ``model_type`` with ``num_layers`` decoder layers."""
    import transformers

    if model_type in ("llava_next", "llava_onevision"):
        from pp_media._cli import tiny_llava_next

        return tiny_llava_next.tiny_config(
            model_type, num_layers=num_layers, tie_word_embeddings=tie_word_embeddings
        )

    text = {**_TEXT, "num_hidden_layers": num_layers, "tie_word_embeddings": tie_word_embeddings}
    tokens = {"image_token_id": IMAGE_TOKEN, "tie_word_embeddings": tie_word_embeddings}
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        tokens.update(
            video_token_id=VIDEO_TOKEN,
            projection_hidden_size=32,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        if model_type == "qwen2_vl":
            vision = {**_QWEN_VISION, "embed_dim": 32, "mlp_ratio": 2}
            return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        if model_type == "qwen3_vl":
            vision = {
                **_QWEN_VISION,
                "depth": 3,
                "patch_size": 16,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 64,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0, 1, 2],
            }
            del text["rope_scaling"]
            text.update(
                head_dim=16,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            )
            return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        if model_type == "qwen3_5":
            vision = {
                **_QWEN_VISION,
                "patch_size": 16,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 64,
                "num_position_embeddings": 64,
            }
            del text["rope_scaling"]
            text.update(
                head_dim=16,
                layer_types=["linear_attention", "full_attention"] * (num_layers // 2)
                + ["linear_attention"] * (num_layers % 2),
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                    "mrope_section": [1, 1, 2],
                    "mrope_interleaved": True,
                },
            )
            return transformers.Qwen3_5Config(text_config=text, vision_config=vision, **tokens)
        vision = {
            **_QWEN_VISION,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if model_type == "glm4v":
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5,
        }
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "out_hidden_size": 64,
            "intermediate_size": 64,
            "image_size": 56,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return transformers.Glm4vConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            image_start_token_id=VISION_START,
            image_end_token_id=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )
    if model_type == "llava":
        vision = _small_vision(
            model_type="clip_vision_model", image_size=LLAVA_IMAGE_SIZE, patch_size=14
        )
        return transformers.LlavaConfig(
            vision_config=vision, text_config={**text, "model_type": "llama"}, **tokens
        )
    if model_type in ("gemma3", "paligemma"):
        siglip = _small_vision(
            model_type="siglip_vision_model", image_size=SIGLIP_IMAGE_SIZE, patch_size=14
        )
        gemma = {**text, "head_dim": 16}
        if model_type == "paligemma":
            return transformers.PaliGemmaConfig(
                vision_config=siglip,
                text_config={**gemma, "model_type": "gemma"},
                projection_dim=64,
                **tokens,
            )
        gemma.update(
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["sliding_attention"] * (num_layers % 2),
        )
        return transformers.Gemma3Config(
            vision_config=siglip,
            text_config={**gemma, "model_type": "gemma3_text"},
            mm_tokens_per_image=4,
            boi_token_index=VISION_START,
            eoi_token_index=VISION_END,
            **tokens,
        )
    if model_type in ("idefics3", "smolvlm"):
        vision = _small_vision(image_size=SIGLIP_IMAGE_SIZE, patch_size=14)
        config_class = (
            transformers.Idefics3Config if model_type == "idefics3" else transformers.SmolVLMConfig
        )
        return config_class(
            vision_config=vision,
            text_config={**text, "model_type": "llama"},
            scale_factor=2,
            **tokens,
        )
    if model_type == "internvl":
        vision = _small_vision(
            image_size=[SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE], patch_size=[14, 14]
        )
        return transformers.InternVLConfig(
            vision_config=vision,
            text_config={**text, "model_type": "qwen2"},
            downsample_ratio=0.5,
            **tokens,
        )
    if model_type == "kimi_k25":
        vision = _small_vision(pos_emb_height=16, pos_emb_width=16)
        deepseek = {
            **text,
            "model_type": "deepseek_v3",
            "num_key_value_heads": 4,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        }
        return transformers.Kimi_K25Config(
            vision_config=vision,
            text_config=deepseek,
            video_token_id=VIDEO_TOKEN,
            projection_hidden_size=32,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            **tokens,
        )
    if model_type == "step3p7":
        vision = _small_vision(image_size=STEP3_GLOBAL_SIZE, patch_size=14)
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
            vision_config=vision, text_config=step3_text, image_token_id=IMAGE_TOKEN
        )
    if model_type == "mistral3":
        vision = _small_vision(model_type="pixtral", image_size=112, patch_size=14, head_dim=16)
        return transformers.Mistral3Config(
            vision_config=vision,
            text_config={**text, "model_type": "mistral", "head_dim": 16},
            spatial_merge_size=2,
            projector_hidden_act="gelu",
            **tokens,
        )
    raise ValueError(
        f"pp_media: no tiny config for model_type {model_type!r}; choose one of "
        f"{', '.join(tiny_model_types())}, or pass a checkpoint directory."
    )


def image_processor(config: Any) -> Any:
    """The family's real image processor, built offline (PIL backend; no torchvision here)."""
    import transformers

    if config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v"):
        name = "Glm4vImageProcessor" if config.model_type == "glm4v" else "Qwen2VLImageProcessor"
        return _pil_class(transformers, name)(
            patch_size=config.vision_config.patch_size,
            merge_size=config.vision_config.spatial_merge_size,
            temporal_patch_size=config.vision_config.temporal_patch_size,
        )
    if config.model_type in ("llava_next", "llava_onevision"):
        from pp_media._cli import tiny_llava_next

        return tiny_llava_next.image_processor(config)
    if config.model_type == "llava":
        size = config.vision_config.image_size
        return _pil_class(transformers, "CLIPImageProcessor")(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    if config.model_type in ("gemma3", "paligemma"):
        size = config.vision_config.image_size
        name = "Gemma3ImageProcessor" if config.model_type == "gemma3" else "SiglipImageProcessor"
        return _pil_class(transformers, name)(size={"height": size, "width": size})
    if config.model_type in ("idefics3", "smolvlm"):
        size = {"longest_edge": config.vision_config.image_size}
        name = (
            "Idefics3ImageProcessor" if config.model_type == "idefics3" else "SmolVLMImageProcessor"
        )
        return _pil_class(transformers, name)(
            do_image_splitting=False, size=size, max_image_size=size
        )
    if config.model_type == "internvl":
        size = config.vision_config.image_size
        return _pil_class(transformers, "GotOcr2ImageProcessor")(
            size={"height": size[0], "width": size[1]},
            crop_to_patches=True,
            min_patches=1,
            max_patches=3,
        )
    if config.model_type == "kimi_k25":
        return FlatPatchLayout(config.vision_config.patch_size)
    if config.model_type == "step3p7":
        return Step3Layout(config.vision_config.image_size)
    if config.model_type == "mistral3":
        vision = config.vision_config
        return _pil_class(transformers, "PixtralImageProcessor")(
            patch_size=vision.patch_size * config.spatial_merge_size,
            size={"longest_edge": vision.image_size},
        )
    raise ValueError(f"pp_media: no image processor known for model_type {config.model_type!r}.")


def _pil_class(transformers: Any, name: str) -> Any:
    """The PIL backend of a processor when transformers has one (what it falls back to without
    torchvision anyway, minus the warning), else the processor class itself."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


class FlatPatchLayout:
    """Stand-in for an image processor that needs torchvision (Kimi-K2.5's): images become
    exactly its output layout, ``pixel_values [sum(h*w), C, patch, patch]`` (each image cut into
    patch x patch tiles, row by row, scaled to [-1, 1]) and ``image_grid_thw`` rows
    ``[1, h, w]`` in patches. Values differ from the real processor's resizing; the layout, which
    is what pipelining depends on, does not."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        patch = self.patch_size
        pixels, grids = [], []
        for image in images:
            array = torch.tensor(list(image.getdata()), dtype=torch.float32)
            height, width = image.height // patch * patch, image.width // patch * patch
            array = array.view(image.height, image.width, 3)[:height, :width] / 127.5 - 1
            tiles = array.view(height // patch, patch, width // patch, patch, 3)
            pixels.append(tiles.permute(0, 2, 4, 1, 3).reshape(-1, 3, patch, patch))
            grids.append([1, height // patch, width // patch])
        return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


class Step3Layout:
    """Stand-in for Step3p7's image processor (it needs torchvision): each image becomes one
    ``[C, S, S]`` global view, plus one ``[C, S/2, S/2]`` local crop for images that are not
    square, with the processor's field names (``pixel_values``, ``pixel_values_local``,
    ``num_local_patches``, ``patch_newline_masks``). Only the layout is the processor's."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _tensor(self, image: Any, size: int) -> Any:
        import torch

        resized = image.convert("RGB").resize((size, size))
        pixels = torch.tensor(list(resized.getdata()), dtype=torch.float32) / 127.5 - 1
        return pixels.view(size, size, 3).permute(2, 0, 1)

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        images = [
            item for entry in images for item in (entry if isinstance(entry, list) else [entry])
        ]
        views = [self._tensor(image, self.size) for image in images]
        crops = [
            self._tensor(image, self.size // 2) for image in images if image.width != image.height
        ]
        local = [int(image.width != image.height) for image in images]
        return {
            "pixel_values": torch.stack(views),
            "pixel_values_local": torch.stack(crops)
            if crops
            else torch.zeros(0, 3, self.size // 2, self.size // 2),
            "num_local_patches": torch.tensor(local),
            "patch_newline_masks": torch.zeros(len(crops), dtype=torch.bool),
        }
