"""The router load-balancing loss a pipeline must match, computed on the unsplit model.

A pipeline applies transformers' ``load_balancing_loss_func`` per microbatch (see
``pp_media._hf.router_loss``); ``model(**batch).loss`` applies it to the whole batch. This
reference runs the unsplit model once on the whole batch with ``output_router_logits=True``,
takes its token loss as the model computes it, and adds, for each microbatch of the engine's
split (``sample_bounds``), ``router_aux_loss_coef * aux`` of that microbatch's rows of the
recorded router logits divided by the number of microbatches, with transformers' own function
from the model's module. Routing is per token, so the rows are those a microbatch forward gives.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds


@dataclass
class RouterReference:
    """The unsplit model's loss with the router loss per microbatch, ``token_loss +
    router_term`` (with their graph: call ``loss.backward()``), the mean per-microbatch
    ``aux`` and the whole batch's ``aux`` (both without the coefficient, detached)."""

    loss: torch.Tensor
    token_loss: torch.Tensor
    router_term: torch.Tensor
    mean_aux: float
    whole_batch_aux: float


def per_microbatch_router_loss(
    model: Any, batch: Mapping[str, torch.Tensor], n_microbatches: int
) -> RouterReference:
    """``model``'s loss on ``batch`` with the router load-balancing term applied per microbatch
    of ``n_microbatches`` (the engine's split of the batch's samples), as a pipeline computes
    it; ``n_microbatches=1`` gives ``model(**batch, output_router_logits=True).loss``."""
    from pp_media._hf.router_loss import RouterLoss

    text = model.config.get_text_config()
    spec = RouterLoss.from_text_config(text)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    output = model(**inputs, output_router_logits=True)
    token_loss = model.loss_function(
        logits=output.logits, labels=batch["labels"], vocab_size=text.vocab_size
    )
    formula = sys.modules[type(model).__module__].load_balancing_loss_func
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    seq = input_ids.shape[1]
    bounds = sample_bounds(input_ids.shape[0], n_microbatches)
    auxes = []
    for k in range(n_microbatches):
        start, end = bounds[k], bounds[k + 1]
        logits = tuple(layer[start * seq : end * seq] for layer in output.router_logits)
        own_mask = None if mask is None else mask[start:end]
        auxes.append(formula(logits, spec.num_experts, spec.top_k, own_mask))
    router_term = spec.coef * auxes[0] / n_microbatches
    for aux in auxes[1:]:
        router_term = router_term + spec.coef * aux / n_microbatches
    mean_aux = torch.stack([aux.detach() for aux in auxes]).mean().item()
    return RouterReference(
        token_loss + router_term, token_loss, router_term, mean_aux, output.aux_loss.item()
    )
