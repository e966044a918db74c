"""Every rank of the mesh agrees on a step's batches before any compute.

Under data parallelism each replica collates its own batch, so a batch that fails a check on
one replica alone would leave the other replicas' ranks waiting in a collective forever. Each
rank prepares its batch, then one ``all_gather`` of four integers over the whole mesh tells
every rank whether some rank failed (then every rank raises the same ``ValueError``, naming the
replica), whether the ranks of each pipeline collated the same batch, and the label tokens of
the global batch that normalise the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pp_media._hf.mesh import ParallelGroups

_FAILED, _TOKENS, _ROWS, _COLUMNS = range(4)


def _message_of(error: BaseException) -> str:
    return str(error).removeprefix("pp_media: ")


def agree_on_batches(
    prepare: Callable[[], Any],
    groups: ParallelGroups,
    agreement_group: dist.ProcessGroup,
    device: torch.device,
) -> tuple[Any, int]:
    """``prepare()`` on this rank (returns ``StepInputs``), checked against every other rank's.

    Returns this rank's inputs and the label tokens of the whole global batch. Raises, on every
    rank alike, the ``ValueError`` of the first failing replica's first failing rank, or one
    saying that the ranks of a pipeline got different batches.
    """
    inputs: Any = None
    error: ValueError | None = None
    try:
        inputs = prepare()
    except ValueError as caught:
        error = caught
    row = torch.zeros(4, dtype=torch.int64)
    if error is not None:
        row[_FAILED] = 1
    else:
        row[_TOKENS] = inputs.label_tokens
        row[_ROWS], row[_COLUMNS] = inputs.input_ids.shape
    row = row.to(device)
    ranks = groups.all_ranks
    gathered = [torch.empty_like(row) for _ in ranks]
    dist.all_gather(gathered, row, group=agreement_group)
    by_rank = dict(zip(ranks, (tensor.tolist() for tensor in gathered), strict=True))

    if any(values[_FAILED] for values in by_rank.values()):
        messages: list[Any] = [None] * len(ranks)
        dist.all_gather_object(
            messages, None if error is None else _message_of(error), group=agreement_group
        )
        by_message = dict(zip(ranks, messages, strict=True))
        for replica, pipeline in enumerate(groups.replica_ranks):
            for rank in pipeline:
                if by_message[rank] is not None:
                    raise ValueError(
                        f"pp_media: the batch of data-parallel replica {replica} (ranks "
                        f"{list(pipeline)}) failed its check, so no rank starts this step: "
                        f"{by_message[rank]}"
                    )
    total = 0
    for replica, pipeline in enumerate(groups.replica_ranks):
        seen = {tuple(by_rank[rank][_TOKENS:]) for rank in pipeline}
        if len(seen) > 1:
            described = {rank: by_rank[rank][_TOKENS:] for rank in pipeline}
            raise ValueError(
                f"pp_media: the ranks of data-parallel replica {replica}'s pipeline got "
                f"different batches ({{rank: [label tokens, rows, columns]}}: {described}); "
                "every rank of one pipeline must collate the same samples. Draw them with "
                "pipe.replica_sampler(dataset) and the same seed on every rank."
            )
        total += by_rank[pipeline[0]][_TOKENS]
    return inputs, total
