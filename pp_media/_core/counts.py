"""Images (or videos) per sample, recovered from the placeholder tokens.

Processors of the flat-patch kind do not say which sample each image belongs to; only the
placeholder tokens in ``input_ids`` do. Items are assigned to samples in batch order, the way
the models consume grid rows.
"""

from __future__ import annotations

import torch

from pp_media._core.errors import media_error, require_int_tensor, require_tensor


def count_items_per_sample(
    input_ids: torch.Tensor,
    placeholder_token_id: int,
    tokens_per_item: torch.Tensor,
) -> torch.Tensor:
    """Number of items (images or videos) of each sample, as an int64 tensor ``[B]``.

    ``tokens_per_item[i]`` is how many placeholder tokens item i occupies in ``input_ids``
    (Qwen2-VL images: ``image_grid_thw.prod(-1) // merge_size**2``). Items fill samples in
    order; a sample whose placeholder count is not a whole number of items is an error.
    Costs one host read.
    """
    ids = require_int_tensor("input_ids", input_ids, 2)
    tokens = require_tensor("tokens_per_item", tokens_per_item)
    if tokens.dim() != 1:
        raise media_error("tokens_per_item", tokens, "a 1-D tensor, one entry per item")
    per_sample = (ids == placeholder_token_id).sum(dim=1)
    sample_ends = per_sample.cumsum(0)
    item_ends = tokens.to(device=ids.device, dtype=torch.int64).cumsum(0)
    # Items whose tokens end at or before each sample's last placeholder.
    items_before = torch.searchsorted(item_ends, sample_ends, right=True)
    reached = torch.cat((torch.zeros(1, dtype=torch.int64, device=ids.device), item_ends))
    matched = reached.index_select(0, items_before) == sample_ends
    total = item_ends[-1:] if tokens.numel() else torch.zeros(1, dtype=torch.int64)
    ok, placeholders, described = torch.cat(
        (matched.all().view(1).long(), sample_ends[-1:], total.to(ids.device))
    ).tolist()
    if placeholders != described or not ok:
        raise media_error(
            "input_ids",
            ids,
            f"{described} placeholder tokens (id {placeholder_token_id}), whole items per sample, "
            "as 'tokens_per_item' describes",
            f"It has {placeholders}; per sample {per_sample.tolist()}. Check the token id and "
            "the tokens per item (for Qwen2-VL: grid product // merge_size**2).",
        )
    return torch.diff(items_before, prepend=torch.zeros(1, dtype=torch.int64, device=ids.device))
