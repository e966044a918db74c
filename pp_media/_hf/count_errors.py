"""Why items per sample cannot be derived from a batch's placeholder tokens, per sample.

Without ``n_images_per_sample`` a step assigns the items (images, videos) to samples in batch
order by their placeholder tokens. When that fails, the error names the first sample whose
placeholders are not a whole number of the next items, with its microbatch, as the
per-sample placeholder check does when the counts are given.
"""

from __future__ import annotations

import torch

from pp_media._core.bounds import sample_bounds


def _microbatch_of(sample: int, batch_size: int, n_microbatches: int) -> int:
    bounds = sample_bounds(batch_size, n_microbatches)
    return next(k for k in range(n_microbatches) if bounds[k] <= sample < bounds[k + 1])


def _items(n: int, kind: str) -> str:
    return f"{n} {kind}" + ("s" if n != 1 else "")


def derived_count_error(
    input_ids: torch.Tensor,
    token_id: int,
    tokens_per_item: torch.Tensor,
    kind: str,
    count_field: str,
    n_microbatches: int,
) -> ValueError | None:
    """The error for a batch whose ``kind`` placeholders do not split into whole items per
    sample (None if they do): the microbatch and sample where the in-order assignment first
    fails, its placeholder count and what the next items would give."""
    if input_ids.dim() != 2 or tokens_per_item.dim() != 1:
        return None
    placeholders = (input_ids == token_id).sum(dim=1).tolist()
    tokens = [int(n) for n in tokens_per_item.tolist()]
    batch_size = len(placeholders)
    advice = (
        f"Without '{count_field}' in the batch, {kind}s go to samples in order by their "
        "placeholder tokens, so an earlier sample may be the damaged one (one that lost a "
        f"whole {kind}'s tokens). Check that the processor's {kind} token expansion matches "
        f"the model config and that no sequence was truncated, or pass '{count_field}'."
    )
    item = 0
    for sample, wanted in enumerate(placeholders):
        reach = [0]
        while reach[-1] < wanted and item + len(reach) - 1 < len(tokens):
            reach.append(reach[-1] + tokens[item + len(reach) - 1])
        if reach[-1] == wanted:
            item += len(reach) - 1
            continue
        where = (
            f"pp_media: microbatch {_microbatch_of(sample, batch_size, n_microbatches)}, "
            f"sample {sample} of the batch: {wanted} {kind} placeholder tokens (id {token_id}) "
            f"in input_ids are not whole {kind}s"
        )
        if len(reach) == 1:
            found = f"no {kind}s are left for it"
        else:
            options = " or ".join(
                f"{total} ({_items(n, kind)})" for n, total in enumerate(reach) if n > 0
            )
            found = f"the next {kind}s in order give {options} features"
        return ValueError(f"{where}: {found}. {advice}")
    if item < len(tokens):
        last = batch_size - 1
        left = sum(tokens[item:])
        return ValueError(
            f"pp_media: {_items(len(tokens) - item, kind)} of the batch ({left} features) are "
            f"left over after the last sample (microbatch {n_microbatches - 1}, sample {last}) "
            f"has its placeholder tokens (id {token_id}): some sample lacks their tokens. "
            f"{advice}"
        )
    return None
