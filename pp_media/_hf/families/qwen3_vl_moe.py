"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL with mixture-of-experts decoder layers."""

from __future__ import annotations

from torch import nn

from pp_media._hf.families.qwen_vl import Qwen3VLAdapter
from pp_media._hf.families.registry import family


@family
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL's layout, M-RoPE and deepstack; a sparse layer's ``mlp`` is a MoE block whose
    ``gate`` (``Qwen3VLMoeTextTopKRouter``) returns the raw router logits first: what
    transformers records as ``router_logits`` for the load-balancing loss. Dense layers
    (``mlp_only_layers``, ``decoder_sparse_step``) have an MLP without a gate."""

    model_types = ("qwen3_vl_moe",)

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        gate = getattr(layer.mlp, "gate", None)
        return None if gate is None or not hasattr(layer.mlp, "experts") else (gate, 0)
