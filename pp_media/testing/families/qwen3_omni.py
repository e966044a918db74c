"""The thinker of Qwen3-Omni (``qwen3_omni_moe_thinker``): Qwen3-VL's image layout and
deepstack, an MoE text model (4 experts, top-2), M-RoPE from the token ids and grids (no
``mm_token_type_ids``); each video one placeholder run, timed by ``video_second_per_grid``.
Audio (the tower is built, tiny) is left out of the batches."""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._moe import EXPERT_WIDTH, EXPERTS, ROUTER_AUX_LOSS_COEF, TOP_K
from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    tiny_family,
)
from pp_media.testing.families.qwen_vl import _MROPE, _VISION_3, QwenVLFamily

AUDIO_TOKEN, AUDIO_START = 989, 988
#: Seconds per temporal patch of every video: the processor's ``temporal_patch_size / fps``
#: at its default 1 frame per second.
SECONDS_PER_GRID = 2.0
_AUDIO = {
    "num_mel_bins": 16,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "d_model": 16,
    "output_dim": 64,
    "downsample_hidden_size": 8,
}


@tiny_family
class Qwen3OmniThinkerFamily(QwenVLFamily):
    model_types = ("qwen3_omni_moe_thinker",)

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        rope = {**_MROPE, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text = {
            **text,
            "head_dim": 16,
            "rope_parameters": rope,
            "num_experts": EXPERTS,
            "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": EXPERT_WIDTH,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        }
        return transformers.Qwen3OmniMoeThinkerConfig(
            text_config=text,
            vision_config={**_VISION_3, "deepstack_visual_indexes": [0, 1]},
            audio_config=_AUDIO,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            audio_token_id=AUDIO_TOKEN,
            audio_start_token_id=AUDIO_START,
            tie_word_embeddings=tie_word_embeddings,
        )

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        """``video_second_per_grid``, one per video, as the Omni processor emits it beside the
        videos (M-RoPE's time axis; the unsplit model fails without it)."""
        grid = batch.get("video_grid_thw")
        if grid is not None:
            batch["video_second_per_grid"] = torch.full((grid.shape[0],), SECONDS_PER_GRID)
