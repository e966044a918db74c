"""What travels between pipeline stages besides the hidden states: a named carry schema.

A family declares its carries (``FamilyAdapter.carries``): each has a name, the place that
produces it (stage 0's embedding step, ``EMBEDDING``, or a decoder layer), the places that read
it (decoder layers, or ``LOSS``: the last stage's loss), its shape per microbatch, its dtype
and whether a gradient flows back through it. Stage layouts hold contiguous runs of decoder
layers in stage order, so a stage boundary is one cut point: the index of the first decoder
layer after it. A carry is live across cut ``c`` when it is produced before the cut
(``producer < c``) and read at or after it (some consumer ``>= c``); every other carry is
dropped at that boundary, so a boundary sends only what later stages read.

``pack`` lays the live carries out in schema order after the hidden states, ``unpack`` names
what a stage received; ``VLMStage`` runs on named carries only. Everything sent must be dense
with a fixed shape per microbatch (torch's stages size their receive buffers from microbatch 0),
which ``pack`` checks against the declared shape. The carries of today's families:

* ``position_ids`` (M-RoPE ``[3, b, T]``, PaliGemma ``[1, T]``): stage 0, every layer.
* ``visual_mask`` ``[b, T]`` and ``deepstack.<i>`` ``[b, T, H]`` (Qwen3-VL): stage 0, read by
  the first deepstack layers; the features carry gradients into the vision tower.
* ``router_stats`` ``[2E + 1]`` (``RouterLoss``): created by stage 0, every stage adds its MoE
  layers' counts and probability sums, the last stage's loss reads it; gradient flows into
  each stage's router logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Producer: stage 0, before any decoder layer (embedding, vision, position ids).
EMBEDDING = -1
#: Consumer: the last stage's loss, after every decoder layer.
LOSS = 1 << 30

#: ``shape(config, batch, seq)``: the carry's shape for a microbatch of ``batch`` rows of ``seq``
#: tokens (``config`` is the model's config).
ShapeFn = Callable[[Any, int, int], tuple[int, ...]]


@dataclass(frozen=True)
class Carry:
    """One named tensor that crosses stage boundaries."""

    name: str
    #: ``EMBEDDING`` or the global index of the decoder layer whose stage produces it.
    producer: int
    #: Global indices of the decoder layers that read it, and/or ``LOSS``.
    consumers: tuple[int, ...]
    shape: ShapeFn
    #: None: the hidden states' dtype.
    dtype: torch.dtype | None = None
    #: A gradient flows back through it: it is sent requiring grad in every microbatch (a
    #: leaf when the producer's value has none, so every microbatch has the same autograd
    #: structure); a carry without gradient is sent detached.
    grad: bool = False

    def live_across(self, cut: int) -> bool:
        """Whether this carry crosses the boundary before decoder layer ``cut``."""
        return self.producer < cut and any(consumer >= cut for consumer in self.consumers)


def live(schema: Sequence[Carry], cut: int) -> tuple[Carry, ...]:
    """The carries of ``schema`` live across the boundary before layer ``cut``, in schema
    order: what that boundary sends after the hidden states."""
    return tuple(carry for carry in schema if carry.live_across(cut))


def pack(
    schema: Sequence[Carry],
    cut: int,
    named: Mapping[str, torch.Tensor],
    config: Any,
    hidden: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The tensors the boundary before layer ``cut`` sends after ``hidden [b, T, H]``, in
    schema order, each checked against its declared shape and dtype."""
    batch, seq = hidden.shape[0], hidden.shape[1]
    out = []
    for carry in live(schema, cut):
        value = named.get(carry.name)
        if value is None:
            raise ValueError(
                f"pp_media: the stage before decoder layer {cut} must send the carry "
                f"'{carry.name}' (produced by {_place(carry.producer)}, read by "
                f"{[_place(c) for c in carry.consumers]}) but has none. The family adapter's "
                "carries and what its stages produce disagree."
            )
        expected = tuple(carry.shape(config, batch, seq))
        dtype = carry.dtype or hidden.dtype
        if tuple(value.shape) != expected or value.dtype != dtype:
            raise ValueError(
                f"pp_media: the carry '{carry.name}' has shape {list(value.shape)} and dtype "
                f"{value.dtype} in a microbatch of {batch} x {seq} tokens; expected "
                f"{list(expected)} and {dtype}. Every microbatch must send a dense tensor of "
                "one fixed shape (torch's stages size their receive buffers from microbatch 0)."
            )
        out.append(_with_grad_rule(carry, value))
    return tuple(out)


def unpack(
    schema: Sequence[Carry], cut: int, received: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Name what a stage received after the hidden states from the boundary before ``cut``."""
    carries = live(schema, cut)
    if len(received) != len(carries):
        raise ValueError(
            f"pp_media: the stage starting at decoder layer {cut} received {len(received)} "
            f"tensors after the hidden states; the carry schema sends {len(carries)} there "
            f"({[carry.name for carry in carries]}). Every stage must use the same schema."
        )
    return {carry.name: value for carry, value in zip(carries, received, strict=True)}


def loss_carries(schema: Sequence[Carry]) -> tuple[Carry, ...]:
    """The carries the loss reads: the last stage returns them after the logits."""
    return tuple(carry for carry in schema if LOSS in carry.consumers)


def _with_grad_rule(carry: Carry, value: torch.Tensor) -> torch.Tensor:
    if not carry.grad:
        return value.detach()
    if torch.is_grad_enabled() and not value.requires_grad:
        return value.detach().requires_grad_()
    return value


def _place(position: int) -> str:
    if position == EMBEDDING:
        return "stage 0's embedding"
    if position == LOSS:
        return "the loss"
    return f"layer {position}"


# --- the carries of today's families --------------------------------------------------------


def position_ids_carry(shape: ShapeFn, n_layers: int) -> Carry:
    """Position ids computed on stage 0 (M-RoPE, PaliGemma), read by every decoder layer."""
    return Carry("position_ids", EMBEDDING, tuple(range(n_layers)), shape, torch.int64)


def deepstack_carries(count: int, hidden_size: int) -> tuple[Carry, ...]:
    """Qwen3-VL's deepstack: the media-position mask and one dense ``[b, T, H]`` feature tensor
    (zero off the media positions) per deepstack layer ``i``, added after layer ``i``."""
    if count == 0:
        return ()
    mask = Carry("visual_mask", EMBEDDING, tuple(range(count)), lambda c, b, s: (b, s), torch.int64)
    features = tuple(
        Carry(
            deepstack_name(i),
            EMBEDDING,
            (i,),
            lambda c, b, s, h=hidden_size: (b, s, h),
            grad=True,
        )
        for i in range(count)
    )
    return (mask, *features)


def deepstack_name(layer: int) -> str:
    return f"deepstack.{layer}"


def router_stats_carry(name: str, size: int) -> Carry:
    """The router load-balancing statistics ``[2E + 1]``: created on stage 0, added to by
    every stage that holds MoE layers, read by the loss (so live across every boundary)."""
    return Carry(name, EMBEDDING, (LOSS,), lambda c, b, s, n=size: (n,), torch.float32, grad=True)
