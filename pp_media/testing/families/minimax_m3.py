"""MiniMax-M3-VL (``minimax_m3_vl``): Qwen-VL-style flat patches with ``image_grid_thw``, 1-D
text positions, a dense first decoder layer, then MoE layers that route on ``sigmoid(logits)
+ e_score_correction_bias``; every other attention layer is block-sparse (the lightning
indexer). Its image processor needs torchvision, so a layout stand-in replaces it."""

from __future__ import annotations

from typing import Any

from pp_media.testing._moe import (
    EXPERT_WIDTH,
    EXPERTS,
    ROUTER_AUX_LOSS_COEF,
    TOP_K,
    perturb_routing_biases,
)
from pp_media.testing._stand_ins import MergedPatchLayout
from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    TinyFamily,
    alternating,
    small_vision,
    tiny_family,
)


@tiny_family
class MiniMaxM3VLFamily(TinyFamily):
    """Videos as flat patches with a ``video_grid_thw``, each frame its own placeholder run."""

    model_types = ("minimax_m3_vl",)
    video_layout = "patches"
    video_frames_separately = True

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        num_layers = text["num_hidden_layers"]
        text = {
            **text,
            "head_dim": 16,
            "rotary_dim": 8,
            "num_local_experts": EXPERTS,
            "num_experts_per_tok": TOP_K,
            "intermediate_size": EXPERT_WIDTH,
            "shared_intermediate_size": EXPERT_WIDTH,
            "dense_intermediate_size": text["intermediate_size"],
            "mlp_layer_types": ["dense"] + ["sparse"] * (num_layers - 1),
            "layer_types": alternating("full_attention", "minimax_m3_sparse", num_layers),
            # Blocks of 8 keys, each query sees its 2 best and the one before it: sparse in
            # the synthetic batches' rows of 50 to 100 tokens.
            "index_n_heads": 2,
            "index_head_dim": 16,
            "index_block_size": 8,
            "index_topk_blocks": 2,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        }
        vision = small_vision(image_size=56, patch_size=14, temporal_patch_size=2)
        return transformers.MiniMaxM3VLConfig(
            text_config=text,
            vision_config={**vision, "spatial_merge_size": 2},
            image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN,
            projector_hidden_size=64,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        vision = config.vision_config
        return MergedPatchLayout(
            vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )

    def make_checkable(self, model: Any, seed: int) -> None:
        """Routing biases, and the projector's four linear weights redrawn at unit gain (std
        ``1 / sqrt(fan_in)``): at std 0.02 and these widths its two stacked MLPs give image
        features of rms 2e-4 beside token embeddings of 2e-2, so the features' gradients
        reach 14 and fp32 summation order alone (10 ulps there) would exceed the 1e-6
        gradient tolerance. At unit gain they are 0.4 and the largest gradient 0.12."""
        import torch

        perturb_routing_biases(model, seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.multi_modal_projector.children():
                if isinstance(layer, torch.nn.Linear):
                    noise = torch.randn(layer.weight.shape, generator=generator)
                    layer.weight.copy_(noise / layer.in_features**0.5)
