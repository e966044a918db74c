"""Qwen3.5 MoE: the dense Qwen3.5 layout with an MoE block in every decoder layer."""

from __future__ import annotations

from torch import nn

from pp_media._hf.families.qwen_vl import Qwen3_5Adapter
from pp_media._hf.families.registry import family
from pp_media._hf.families.routers import mlp_gate


@family
class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5's layout and mixed linear / full attention; every decoder layer is an MoE block
    (``mlp.gate``, routed experts and a sigmoid-gated shared expert)."""

    model_types = ("qwen3_5_moe",)

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        return mlp_gate(layer)
