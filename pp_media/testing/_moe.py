"""What the mixture-of-experts fixtures share: tiny expert sizes and routing biases."""

from __future__ import annotations

from typing import Any

import torch

#: The routed experts of every tiny MoE fixture here: few, top-2, narrow.
EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 32
#: Large enough that the router loss moves the loss far above the parity tolerance when on.
ROUTER_AUX_LOSS_COEF = 0.01
#: Spread of the routing biases: the scores ``sigmoid(logits)`` are 0.5 +- 0.04 at initialisation.
ROUTING_BIAS_STD = 0.05


def perturb_routing_biases(model: Any, seed: int) -> None:
    """Random ``e_score_correction_bias`` buffers (zeros at initialisation, trained in real
    checkpoints), in place. At zero the experts a layer routes to are the top-k of
    ``softmax(logits)`` too, which is what transformers' load-balancing loss counts: with
    random biases the two differ, so a router loss that counted the routed experts instead
    would fail the parity check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                noise = torch.randn(buffer.shape, generator=generator)
                buffer.copy_(ROUTING_BIAS_STD * noise.to(buffer.dtype))
