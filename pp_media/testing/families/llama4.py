"""Llama 4: 56x56 tiles (4 placeholders each after pixel shuffle), images of one tile or of an
``h x w`` grid plus a global tile, a text model of MoE and dense layers, chunked-attention and
no-RoPE layers. Its image processor needs torchvision: ``TileLayout`` emits its output layout,
and ``image_runs`` expands each image's tokens as ``Llama4Processor._prompt_split_image`` does.
The unsplit ``Llama4ForConditionalGeneration.forward`` fails in transformers 5.24
(``AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'``,
modeling_llama4.py:1318), after computing everything but the loss: ``reference_loss`` is that
computation, from the model's own parts."""

from __future__ import annotations

from typing import Any

import torch

from pp_media._hf.families.llama4 import tile_placeholders
from pp_media.testing._stand_ins import _rgb_values
from pp_media.testing._tiny import IMAGE_TOKEN, VISION_END, VISION_START, TinyFamily, tiny_family

#: One tile is the vision tower's image size: (56 // 14)**2 * 0.5**2 = 4 placeholders.
TILE_SIZE = 56
#: The image processor's default tile budget per image.
MAX_PATCHES = 16
#: Token ids of ``<|image|>`` (before the global tile's placeholders) and of the tile
#: separators, which the model config does not name (the processor's tokenizer does).
IMAGE_MARK, TILE_X_SEPARATOR, TILE_Y_SEPARATOR = 996, 997, 998


def tile_grids(max_patches: int) -> list[tuple[int, int]]:
    """Every ``(tiles down, tiles across)`` grid of at most ``max_patches`` tiles, in the order
    of the processor's ``find_supported_resolutions`` (grouped by aspect ratio, first seen from
    the largest tile count down)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_patches, 0, -1):
        for down in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(down / (count // down), []).append((down, count // down))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_grid(height: int, width: int, size: int, max_patches: int) -> tuple[int, int]:
    """The processor's ``get_best_fit`` in tiles: the smallest upscaling of the image onto a
    grid canvas without distortion, else the least downscaling; the smallest canvas on ties."""
    grids = tile_grids(max_patches)
    scales = [min(down * size / height, across * size / width) for down, across in grids]
    up = [scale for scale in scales if scale >= 1]
    chosen = min(up) if up else max(scales)
    fits = [grid for grid, scale in zip(grids, scales, strict=True) if scale == chosen]
    return min(fits, key=lambda grid: grid[0] * grid[1])


def fitted_size(height: int, width: int, grid: tuple[int, int], size: int) -> tuple[int, int]:
    """The image's size on its grid canvas, as the processor resizes it: the canvas, but not
    upscaling a side past ``size``, then the largest size of the image's aspect ratio that fits
    (``get_max_res_without_distortion``)."""
    target_h = min(max(height, size), grid[0] * size)
    target_w = min(max(width, size), grid[1] * size)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return max(min(int(height * scale_w), target_h), 1), target_w
    return target_h, max(min(int(width * scale_h), target_w), 1)


class TileLayout:
    """Stand-in for ``Llama4ImageProcessor(size=S, max_patches=...)``: each image onto its
    best-fit ``h x w`` grid canvas (resized without distortion, upscaled at most to S, padded at
    the bottom and right), cut into ``h * w`` tiles ``[3, S, S]`` row by row, and, when
    ``h * w > 1``, a global tile (the whole image resized to ``S x S``) last; values scaled to
    [-1, 1] (mean and std 0.5, padding -1). ``pixel_values`` is every image's tiles in order,
    ``aspect_ratios`` each image's ``(h, w)``. The processor's layout; its resampling differs
    (PIL bilinear, fp32 instead of its torchvision bf16)."""

    def __init__(self, size: int, max_patches: int = MAX_PATCHES) -> None:
        self.size, self.max_patches = size, max_patches

    def _pixels(self, image: Any, height: int, width: int) -> torch.Tensor:
        resized = image.convert("RGB").resize((width, height))
        return (_rgb_values(resized) / 127.5 - 1).view(height, width, 3).permute(2, 0, 1)

    def _tiles(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        size = self.size
        down, across = best_grid(image.height, image.width, size, self.max_patches)
        height, width = fitted_size(image.height, image.width, (down, across), size)
        canvas = torch.full((3, down * size, across * size), -1.0)
        canvas[:, :height, :width] = self._pixels(image, height, width)
        tiles = canvas.view(3, down, size, across, size).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(down * across, 3, size, size)
        if down * across > 1:
            tiles = torch.cat((tiles, self._pixels(image, size, size).unsqueeze(0)))
        return tiles, (down, across)

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        tiles, ratios = zip(*(self._tiles(image) for image in images), strict=True)
        return {
            "pixel_values": torch.cat(tiles),
            "aspect_ratios": torch.tensor(ratios, dtype=torch.int64).view(-1, 2),
        }


def image_prompt(aspect_ratio: tuple[int, int], per_tile: int) -> list[int]:
    """One image's tokens, as ``Llama4Processor._prompt_split_image`` writes them:
    ``<|image_start|>``, for a grid of several tiles each row's tiles (``per_tile``
    ``<|patch|>`` each, ``<|tile_x_separator|>`` between them, ``<|tile_y_separator|>`` after the
    row), then ``<|image|>``, the global (or only) tile's placeholders, ``<|image_end|>``."""
    down, across = aspect_ratio
    tokens = [VISION_START]
    if down * across > 1:
        for _ in range(down):
            for x in range(across):
                tokens += [IMAGE_TOKEN] * per_tile
                if x < across - 1:
                    tokens.append(TILE_X_SEPARATOR)
            tokens.append(TILE_Y_SEPARATOR)
    return [*tokens, IMAGE_MARK, *[IMAGE_TOKEN] * per_tile, VISION_END]


@tiny_family
class Llama4Family(TinyFamily):
    """MoE in layers 1 and 3 (``interleave_moe_layer_step`` 2), dense MLPs in 0 and 2; RoPE
    with chunked attention (chunks of 16 tokens) in layers 0 and 2, no RoPE with full
    attention in 1 and 3 (``no_rope_layer_interval`` 2)."""

    model_types = ("llama4",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        text = {
            **text,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "intermediate_size_mlp": 128,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": 16,
            "no_rope_layer_interval": 2,
        }
        vision = {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TILE_SIZE,
            "patch_size": 14,
            "vision_output_dim": 64,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
            "pixel_shuffle_ratio": 0.5,
        }
        return transformers.Llama4Config(
            text_config=text,
            vision_config=vision,
            image_token_index=IMAGE_TOKEN,
            boi_token_index=VISION_START,
            eoi_token_index=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        return TileLayout(config.vision_config.image_size)

    def image_runs(self, config: Any, media: dict[str, torch.Tensor]) -> list[list[int]]:
        per_tile = tile_placeholders(config)
        return [image_prompt(tuple(ratio), per_tile) for ratio in media["aspect_ratios"].tolist()]

    def reference_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Llama4ForConditionalGeneration.forward``'s loss, line by line up to where it
        fails: token embeddings, the vision model's output flattened through the projector and
        scattered into the placeholders, the language model, the loss on its logits."""
        input_ids = batch["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)
        pixels = batch.get("pixel_values")
        if pixels is not None:
            features = model.get_image_features(pixel_values=pixels, return_dict=True)
            hidden = features.last_hidden_state
            projected = model.multi_modal_projector(hidden.view(-1, hidden.size(-1)))
            mask = model.get_placeholder_mask(input_ids, embeds, projected)
            embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
        logits = model.language_model(
            inputs_embeds=embeds, attention_mask=batch.get("attention_mask")
        ).logits
        return model.loss_function(
            logits=logits, labels=batch["labels"], vocab_size=model.config.text_config.vocab_size
        )
