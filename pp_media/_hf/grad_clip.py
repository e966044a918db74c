"""Gradient clipping by the norm of the whole model, over every pipeline stage and DP shard.

Each rank computes the norm of its own gradients with torch's ``get_total_norm`` (for FSDP's
sharded DTensor gradients that already covers the dp group's shards), leaving out the copy of a
tied embedding so it counts once; the per-rank norms are combined over the pipeline group (sum
of p-th powers, or max for the inf-norm) and every rank clips with torch's
``clip_grads_with_norm_`` by the same total. The norms are torch's fp32 ones, and a shard's
rounds differently from the whole tensor's: torch's norm of one 500 x 64 shard of a tiny model's
embedding gradient was 3e-6 relative off its fp64 value, so the DP x PP norm was measured up to
4e-6 relative off the unsplit model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def clip_grad_norm(
    parameters: Sequence[nn.Parameter],
    counted: Sequence[nn.Parameter],
    max_norm: float,
    norm_type: float,
    pp_group: dist.ProcessGroup,
    device: torch.device,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` (this rank's) by the global norm of ``counted``'s
    (this rank's, each tied matrix once) over the pipeline; returns that norm on every rank."""
    grads = [param.grad for param in counted if param.grad is not None]
    if grads:
        local = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        if isinstance(local, DTensor):
            local = local.full_tensor()
    else:
        local = torch.zeros((), dtype=torch.float32)
    local = local.to(device=device, dtype=torch.float32)
    if math.isinf(norm_type):
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
    else:
        total = local.pow(norm_type)
        dist.all_reduce(total, group=pp_group)
        total = total.pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"pp_media: the total norm of order {norm_type} of the gradients is {total.item()}; "
            "clip_grad_norm_(error_if_nonfinite=False) clips anyway."
        )
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total
