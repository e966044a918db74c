"""When a pipeline adds the router load-balancing loss, and which rows it counts.

On or off follows transformers: the unsplit model adds ``router_aux_loss_coef * aux`` when its
text config's ``output_router_logits`` is true (``build_vlm_pipeline(output_router_logits=)``
overrides it), and only in families that compute one: those whose adapter names a router for
some decoder layer (``FamilyAdapter.router``). Off, the stages carry no statistics and the loss
is exactly the token loss.

Rows: transformers weights each token by the flattened attention mask (every token when there
is none). The pipeline pads short microbatches with rows whose attention mask is 1 (so no
attention row is fully masked); those rows must not count, so when a batch was padded every
stage gets ``ROUTER_MASK``: the padded attention mask (ones without one) with the pad rows
zeroed. Each microbatch's statistics then are exactly those of its own samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pp_media._core.padding import pad_to_even_microbatches
from pp_media._hf.families.base import FamilyAdapter
from pp_media._hf.router_loss import RouterLoss


def resolve_router_loss(
    adapter: FamilyAdapter,
    config: Any,
    layers: nn.ModuleList | list[nn.Module],
    output_router_logits: bool | None,
) -> RouterLoss | None:
    """The ``RouterLoss`` a pipeline adds, or None (off). ``layers``: the unsplit model's
    decoder layers; ``output_router_logits``: the caller's override (None: the config's)."""
    text_config = config.get_text_config()
    wanted = output_router_logits
    if wanted is None:
        wanted = bool(getattr(text_config, "output_router_logits", False))
    if not wanted:
        return None
    if not has_router_loss(adapter, layers):
        if output_router_logits:
            raise ValueError(
                f"pp_media: output_router_logits=True, but {config.model_type} has no router "
                "load-balancing loss (its adapter names no MoE router in any decoder layer). "
                "Leave output_router_logits at None or False for this model."
            )
        return None
    return RouterLoss.from_text_config(text_config)


def has_router_loss(adapter: FamilyAdapter, layers: nn.ModuleList | list[nn.Module]) -> bool:
    """Whether the family computes a router load-balancing loss: its adapter names a router
    in some decoder layer of ``layers``."""
    return any(adapter.router(layer) is not None for layer in layers)


def router_mask(
    kwargs: dict[str, torch.Tensor], input_ids: torch.Tensor, batch_size: int, n_microbatches: int
) -> torch.Tensor | None:
    """The ``ROUTER_MASK`` step argument for a batch of ``batch_size`` samples padded to
    ``input_ids``'s rows, or None when nothing was padded (the attention mask counts as is)."""
    if input_ids.shape[0] == batch_size:
        return None
    real = {"rows": torch.ones(batch_size, dtype=torch.int64)}
    pad_to_even_microbatches(real, batch_size, n_microbatches, pad_values={"rows": 0})
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.int64)
    return mask * real["rows"].unsqueeze(-1).to(mask.dtype)
