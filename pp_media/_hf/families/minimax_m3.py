"""MiniMax-M3-VL (``minimax_m3_vl``): Qwen-VL-style flat patches with a ``[t, h, w]`` grid
per item, 1-D text positions, an MoE text model with block-sparse attention layers."""

from __future__ import annotations

from torch import nn

from pp_media._hf.families.base import FamilyAdapter
from pp_media._hf.families.qwen_vl import IMAGES, VIDEOS, QwenVLAdapter
from pp_media._hf.families.registry import family
from pp_media._hf.families.routers import mlp_gate


@family
class MiniMaxM3VLAdapter(FamilyAdapter):
    """Placeholders per item: ``t*h*w // merge**2`` (Qwen-VL's rule; a video's frames each have
    their own run). Positions are the text model's own ``arange`` on every stage, which the
    sparse layers' indexer also reads. Dense layers per ``mlp_layer_types``; the MoE layers
    route on ``sigmoid(logits) + e_score_correction_bias`` while the router loss counts the
    raw logits' softmax."""

    model_types = ("minimax_m3_vl",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    media = (IMAGES, VIDEOS)
    tokens_per_item = QwenVLAdapter.tokens_per_item

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        return mlp_gate(layer)
