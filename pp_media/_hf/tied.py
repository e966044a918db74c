"""Tied input and output embeddings across pipeline stages, kept equal as Megatron does.

When stage 0 (token embeddings) and the last stage (LM head) run on different ranks, each holds
its own copy of the matrix; after every backward the two copies' gradients are summed over a
two-rank group, so both see the gradient of the tied parameter and stay equal through any
optimizer step. When both stages run on one rank (V schedules) they share one Parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


class TiedEmbeddingSync:
    """Sums the embedding-copy gradients between the first and the last stage's ranks."""

    def __init__(self, weight: nn.Parameter | None, group: dist.ProcessGroup | None) -> None:
        self.weight = weight
        self.group = group

    @classmethod
    def create(
        cls,
        tied: bool,
        local_weight: nn.Parameter | None,
        first_rank: int,
        last_rank: int,
    ) -> TiedEmbeddingSync:
        """``local_weight``: this rank's copy (embedding on stage 0's rank, LM head on the last
        stage's); ranks are global. Only the two ranks involved create the group."""
        if not tied or first_rank == last_rank or local_weight is None:
            return cls(None, None)
        group = dist.new_group([first_rank, last_rank], use_local_synchronization=True)
        return cls(local_weight, group)

    @property
    def active(self) -> bool:
        return self.group is not None

    def before_step(self) -> None:
        """Halve the gradient the copies already share (equal on both ranks after every
        sync), so that ``sync_grads``' sum adds each copy's new contribution once: gradients
        accumulated over several steps stay the tied parameter's (halving is exact in binary
        floating point)."""
        if self.weight is not None and self.weight.grad is not None:
            self.weight.grad.mul_(0.5)

    def sync_grads(self) -> None:
        if self.weight is None:
            return
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        dist.all_reduce(self.weight.grad, group=self.group)


def unique_parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Every parameter of ``modules`` once, even when stages on one rank share one."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params
