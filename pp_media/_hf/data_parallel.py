"""Data parallelism over the pipeline stages: FSDP2 sharding or replication over the ``dp`` mesh.

Each stage module is wrapped with torch's ``fully_shard`` (or the FSDP-based ``replicate``)
per decoder layer and then on the stage module itself, so that the stage module is the FSDP
root: torch's pipeline stages defer the gradient reduction of an FSDP root to the end of the
schedule (``perform_reduce_grad``) instead of reducing after every microbatch. Parameters stay
gathered between forward and backward (``reshard_after_forward=False``), as every microbatch
would otherwise gather them again. The loss is already normalised by the label tokens of the
whole global batch, so the reduction is a plain sum (divide factor 1, sum-only collectives,
which gloo needs as it has no PREMUL_SUM).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.data import Dataset, DistributedSampler

from pp_media._hf.families.base import FamilyAdapter

DATA_PARALLEL_MODES = ("fsdp", "replicate")
_BF16_NAMES = ("bf16", "bfloat16")


def mixed_precision_policy(
    mixed_precision: str | torch.dtype | None, data_parallel: bool
) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for ``mixed_precision``: bf16 compute, fp32 parameters kept sharded,
    gradients reduced in fp32. None for plain fp32 (or the stages' own dtype)."""
    if mixed_precision is None:
        return None
    if mixed_precision not in (torch.bfloat16, *_BF16_NAMES):
        raise ValueError(
            f"pp_media: mixed_precision={mixed_precision!r} is not supported; use 'bf16' "
            "(bfloat16 compute, fp32 gradient reduction) or None."
        )
    if not data_parallel:
        raise ValueError(
            "pp_media: mixed_precision needs the FSDP wrapping of data parallelism; pass "
            "dp_size (1 is fine) or mesh to build_vlm_pipeline."
        )
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=None
    )


def check_mode(data_parallel: str) -> None:
    if data_parallel not in DATA_PARALLEL_MODES:
        raise ValueError(
            f"pp_media: data_parallel={data_parallel!r}; choose 'fsdp' (parameters sharded over "
            "the dp ranks) or 'replicate' (every dp rank holds all its stages' parameters)."
        )


def untie_local_head(stage: nn.Module, adapter: FamilyAdapter) -> nn.Parameter:
    """Give the LM head of ``stage`` its own copy of the tied embedding matrix.

    FSDP refuses one parameter in two FSDP modules, and the two stages of a V schedule are two
    FSDP roots on one rank; the copy starts equal and its gradient is summed with the
    embedding's after each step (``TiedEmbeddingSync``), so both stay equal. The head module is
    copied, so the model the stages were cut from keeps its tie.
    """
    parent_path, _, name = adapter.head_path.rpartition(".")
    parent = stage.get_submodule(parent_path) if parent_path else stage
    head = copy.copy(parent.get_submodule(name))
    head._parameters = dict(head._parameters)
    head.weight = nn.Parameter(head.weight.detach().clone())
    parent._modules[name] = head
    return head.weight


def wrap_stages(
    stages: Sequence[nn.Module],
    adapter: FamilyAdapter,
    dp_mesh: DeviceMesh,
    mode: str,
    mp_policy: MixedPrecisionPolicy | None,
) -> None:
    """``fully_shard`` (or ``replicate``) each decoder layer of each stage, then the stage."""
    options: dict[str, Any] = {"mesh": dp_mesh}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if mode == "fsdp":
        wrap: Any = fully_shard
        options["reshard_after_forward"] = False
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        wrap = replicate
    for stage in stages:
        for layer in stage.get_submodule(adapter.text_model_path).layers:
            wrap(layer, **options)
        wrap(stage, **options)
        for module in stage.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)


def sum_over_dp(loss: torch.Tensor, dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The global batch's loss from each replica's share (each already divided by the global
    label tokens); called on the last stage's ranks, which form one dp group."""
    if dp_group is None:
        return loss
    dist.all_reduce(loss, group=dp_group)
    return loss


def replica_sampler(
    dataset: Dataset[Any],
    dp_rank: int,
    dp_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
) -> DistributedSampler[Any]:
    """torch's ``DistributedSampler`` over the data-parallel replicas, not over the ranks: every
    rank of one pipeline draws the same samples, and the replicas draw disjoint ones."""
    return DistributedSampler(
        dataset,
        num_replicas=dp_size,
        rank=dp_rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
