"""GLM-4.5V (``glm4v_moe``): GLM-4V's layout with an MoE text model."""

from __future__ import annotations

from torch import nn

from pp_media._hf.families.qwen_vl import Glm4vAdapter
from pp_media._hf.families.registry import family
from pp_media._hf.families.routers import mlp_gate


@family
class Glm4vMoeAdapter(Glm4vAdapter):
    """GLM-4V's layout (images or videos per forward, not both); the first
    ``first_k_dense_replace`` decoder layers are dense, the rest route on ``sigmoid(logits) +
    e_score_correction_bias`` while the router loss counts the raw logits' softmax."""

    model_types = ("glm4v_moe",)

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        return mlp_gate(layer)
