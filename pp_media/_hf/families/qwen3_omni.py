"""The thinker of Qwen3-Omni (``qwen3_omni_moe_thinker``): Qwen3-VL's images and deepstack, an
MoE text model, and M-RoPE positions computed from the token ids, the grids and each video's
``video_second_per_grid`` (no ``mm_token_type_ids``). Audio is not supported yet: the audio
tower stays on stage 0 unused, and a batch with audio is refused by name (a step would
otherwise drop ``input_features`` and train on the bare audio placeholders)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._hf.carry import Carry
from pp_media._hf.families import qwen_vl
from pp_media._hf.families.qwen_vl import Qwen3VLAdapter
from pp_media._hf.families.registry import family
from pp_media._hf.families.routers import mlp_gate
from pp_media._layouts import GRID_IMAGES, MediaLayout
from pp_media._layouts import VIDEOS as VIDEO_GROUP

SECONDS = "video_second_per_grid"
#: What the Omni processor emits for audio, beside the audio placeholder tokens.
AUDIO_FIELDS = ("input_features", "feature_attention_mask", "audio_feature_lengths")
VIDEOS = replace(qwen_vl.VIDEOS, requires=("video_grid_thw", SECONDS))
#: Images by grid; videos by grid, each with its seconds per temporal patch.
OMNI_LAYOUT = MediaLayout((GRID_IMAGES, replace(VIDEO_GROUP, per_item=(SECONDS,), extras=())))


@family
class Qwen3OmniThinkerAdapter(Qwen3VLAdapter):
    """Placeholders per item ``t*h*w // merge**2``, one run per video between vision start and
    end tokens. Stage 0 computes the positions with the thinker's ``get_rope_index`` on its
    microbatch (sample by sample, as the unsplit model does on the whole batch) and sends them
    on; every MoE layer's router is ``mlp.gate``."""

    model_types = ("qwen3_omni_moe_thinker",)
    vision_paths = ("model.visual", "model.audio_tower")
    media = (qwen_vl.IMAGES, VIDEOS)
    media_layout = OMNI_LAYOUT
    stage_fields = ()

    def carries(self, config: Any) -> tuple[Carry, ...]:
        """Qwen3-VL's carries, with float32 position ids: ``get_rope_index`` returns them so
        (a video's time positions are seconds x ``position_id_per_seconds``, not always whole)."""
        return tuple(
            replace(carry, dtype=torch.float32) if carry.name == "position_ids" else carry
            for carry in super().carries(config)
        )

    def position_ids(
        self,
        base_model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        if attention_mask is None:
            # What the text model does itself when the unsplit model computes no positions.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            return positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1).float()
        position_ids, _ = base_model.get_rope_index(
            input_ids,
            image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"),
            attention_mask=attention_mask,
            second_per_grids=media.get(SECONDS),
        )
        # Without media the positions are one expanded (non-contiguous) row; sends need a copy.
        return position_ids.contiguous()

    def step_fields(
        self, config: Any, batch: Mapping[str, Any], has_media: bool
    ) -> dict[str, torch.Tensor]:
        """None (positions come from the token ids); refuses a batch with audio."""
        audio = [name for name in AUDIO_FIELDS if batch.get(name) is not None]
        tokens = int((batch["input_ids"] == config.audio_token_id).sum())
        if audio or tokens:
            raise ValueError(
                f"pp_media: the batch holds audio ({', '.join(audio) or 'no audio fields'}; "
                f"{tokens} audio placeholder tokens, id {config.audio_token_id}) but the "
                "qwen3_omni_moe_thinker pipeline takes images and videos only; leave the "
                "audio out of the processor's inputs."
            )
        return {}

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        return mlp_gate(layer)
