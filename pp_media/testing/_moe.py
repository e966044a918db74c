"""What the mixture-of-experts fixtures share: tiny expert sizes and routing biases."""

from __future__ import annotations

from typing import Any

import torch

#: The routed experts of every tiny MoE fixture here: few, top-2, narrow.
EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 32
#: ``router_aux_loss_coef`` (real checkpoints: 1e-3 or 1e-4): large enough that, with the router
#: loss on, its term, its gradients and the gap between its per-microbatch and whole-batch forms
#: stand far above the fp32 parity tolerances (at 0.01 the tiny Qwen3.5 MoE's gap on the parity
#: batch was 1.6e-5, under 4x the loss tolerance, and its router gradients moved by 9.8e-5).
ROUTER_AUX_LOSS_COEF = 0.05
#: Spread of the routing biases: the scores ``sigmoid(logits)`` are 0.5 +- 0.04 at initialisation.
ROUTING_BIAS_STD = 0.05


def perturb_routing_biases(model: Any, seed: int) -> None:
    """Random ``e_score_correction_bias`` buffers (GLM-4.5V, MiniMax-M3-VL, Inkling) and
    parameters (ERNIE-4.5-VL), in place: zeros at initialisation, trained in real checkpoints.
    At zero the experts a layer routes to are the top-k of ``softmax(logits)`` too, which is
    what transformers' load-balancing loss counts: with random biases the two differ, so a
    router loss that counted the routed experts instead would fail the parity check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, bias in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                noise = torch.randn(bias.shape, generator=generator)
                bias.copy_(ROUTING_BIAS_STD * noise.to(bias.dtype))
