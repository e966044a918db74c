"""Where the MoE families' routers live: what ``FamilyAdapter.router`` returns for them."""

from __future__ import annotations

from torch import nn


def mlp_gate(layer: nn.Module) -> tuple[nn.Module, int] | None:
    """A decoder layer's ``mlp.gate`` and output index 0 (its raw router logits, what
    transformers records as ``router_logits``); None for a dense layer, whose MLP has no
    ``gate`` (GLM-4.5V's ``first_k_dense_replace``, MiniMax's ``mlp_layer_types``, Qwen's
    ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    gate = getattr(layer.mlp, "gate", None)
    return None if gate is None else (gate, 0)
