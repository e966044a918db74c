"""Tied input and output embeddings across pipeline stages, kept equal as Megatron does.

When stage 0 (token embeddings) and the last stage (LM head) run on different ranks, each holds
its own copy of the matrix; after every backward the two copies' gradients are summed over a
two-rank group, so both see the gradient of the tied parameter and stay equal through any
optimizer step. When both stages run on one rank (V schedules) they share one Parameter, except
under FSDP, which refuses a parameter in two FSDP roots: there the LM head gets its own copy and
the two copies' gradients are summed on the rank. Under data parallelism each replica's pipeline
has its own pair, and the gradients summed are the local shards, sharded alike on both stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor gradient (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _grad_of(weight: nn.Parameter) -> torch.Tensor:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return _local(weight.grad)


#: The two-rank groups created so far, by their global ranks.
_PAIR_GROUPS: dict[tuple[int, int], dist.ProcessGroup] = {}


def _pair_group(first_rank: int, last_rank: int) -> dist.ProcessGroup:
    """The group of two global ranks, created once per process: torch names a locally
    synchronised group by its ranks alone, so a second pipeline creating the same pair again
    would rendezvous under the first one's store keys (seen to hang with 4 gloo ranks)."""
    key = (first_rank, last_rank)
    group = _PAIR_GROUPS.get(key)
    if group is not None:
        try:
            dist.get_process_group_ranks(group)
        except (KeyError, ValueError, RuntimeError):  # the world was destroyed and made again
            group = None
    if group is None:
        group = _PAIR_GROUPS[key] = dist.new_group(list(key), use_local_synchronization=True)
    return group


class TiedEmbeddingSync:
    """Sums the embedding-copy gradients between the first and the last stage's ranks."""

    def __init__(
        self,
        weight: nn.Parameter | None,
        group: dist.ProcessGroup | None,
        *,
        local_copy: nn.Parameter | None = None,
        is_copy: bool = False,
    ) -> None:
        self.weight = weight
        self.group = group
        #: The LM head's own copy when both stages are on this rank (FSDP only).
        self.local_copy = local_copy
        #: Whether ``weight`` is the LM head's copy (this rank holds the last stage only).
        self.is_copy = is_copy

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
        return cls(
            local_weight, _pair_group(first_rank, last_rank), is_copy=dist.get_rank() == last_rank
        )

    @classmethod
    def on_one_rank(cls, embedding: nn.Parameter, head_copy: nn.Parameter) -> TiedEmbeddingSync:
        """Both stages on this rank, each with its own copy (FSDP's V schedules)."""
        return cls(embedding, None, local_copy=head_copy)

    @property
    def active(self) -> bool:
        return self.group is not None

    @property
    def duplicate(self) -> nn.Parameter | None:
        """This rank's parameter that repeats the tied matrix (counted once in norms), if any."""
        if self.local_copy is not None:
            return self.local_copy
        return self.weight if self.is_copy else None

    def before_step(self) -> None:
        """Halve the gradient the copies already share (equal on both copies after every
        sync), so that ``sync_grads``' sum adds each copy's new contribution once: gradients
        accumulated over several steps stay the tied parameter's (halving is exact in binary
        floating point). Under FSDP the halved tensors are the local shards."""
        for weight in (self.weight, self.local_copy):
            if weight is not None and weight.grad is not None:
                _local(weight.grad).mul_(0.5)

    def sync_grads(self) -> None:
        if self.weight is None:
            return
        if self.local_copy is not None:
            mine, theirs = _grad_of(self.weight), _grad_of(self.local_copy)
            mine.add_(theirs)
            theirs.copy_(mine)
            return
        dist.all_reduce(_grad_of(self.weight), group=self.group)


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
