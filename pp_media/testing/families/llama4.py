"""Llama 4: one 56x56 tile per image (4 placeholders after pixel shuffle), a text model of MoE
and dense layers, chunked-attention and no-RoPE layers. Its image processor needs torchvision:
``OneTileLayout`` emits its output layout for ``max_patches=1``. The unsplit
``Llama4ForConditionalGeneration.forward`` fails in transformers 5.24
(``AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'``,
modeling_llama4.py:1318), after computing everything but the loss: ``reference_loss`` is that
computation, from the model's own parts."""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._stand_ins import _rgb_values
from pp_media.testing._tiny import IMAGE_TOKEN, VISION_END, VISION_START, TinyFamily, tiny_family

#: One tile is the vision tower's image size: (56 // 14)**2 * 0.5**2 = 4 placeholders.
TILE_SIZE = 56


class OneTileLayout:
    """Stand-in for ``Llama4ImageProcessor(max_patches=1)``: every image resized to one
    ``[3, S, S]`` tile scaled to [-1, 1] (mean and std 0.5), ``aspect_ratios`` ``[1, 1]`` per
    image. The processor's layout; its resizing and padding values differ."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        tiles = []
        for image in images:
            resized = image.convert("RGB").resize((self.size, self.size))
            pixels = _rgb_values(resized) / 127.5 - 1
            tiles.append(pixels.view(self.size, self.size, 3).permute(2, 0, 1))
        ratios = torch.ones(len(images), 2, dtype=torch.int64)
        return {"pixel_values": torch.stack(tiles), "aspect_ratios": ratios}


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
        return OneTileLayout(config.vision_config.image_size)

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
