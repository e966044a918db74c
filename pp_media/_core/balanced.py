"""Media-balanced microbatches: the public entry points over one planner.

``balance_microbatches`` permutes a batch's samples (``balance``: the assignment and the
permutation; ``media_plan``: the costs, read once). ``balance_and_prepare_vlm_media_for_pp``
also splits the media, from the same reading and the same host read: the split after the
permutation takes each sample's items and rows from the plan, so the batch is validated and
read once for both.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from collections.abc import Collection, MutableMapping, Sequence
from typing import Any

import torch

from pp_media._core.balance import _balanced_order, _Order, permuted_fields
from pp_media._core.bounds import sample_bounds, sample_ends_tensor
from pp_media._core.errors import check_microbatches, require_int_tensor, require_tensor
from pp_media._core.media_plan import (
    SampleCost,
    SampleLayout,
    _Plan,
    _plan,
    plan_flat_counted,
)
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._core.reading import (
    GroupReading,
    _require_rows,
    flat_counted_fields,
    present_media,
)
from pp_media._core.row_maps import Chunks, split_group
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._layouts import SEED_LAYOUT, MediaGroup, MediaLayout

#: Batch key under which ``wrap_vlm_collate_for_pp(..., balance_media=...)`` records the order:
#: an int64 tensor with one entry per row the engine splits, ``order[j]`` = index in the collated
#: batch of the sample at row j, -1 for pad rows. Not a model input: give the engine only the
#: text fields (``VLMPipeline.step`` reads only those).
VLM_PP_SAMPLE_ORDER_KEY = "_vlm_pp_sample_order"


def _refuse_prepared(batch: MutableMapping[str, Any]) -> None:
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch already carries '{VLM_PP_MEDIA_KEY}'; balance_microbatches "
            "re-orders the raw media, so call it before prepare_vlm_media_for_pp."
        )


def _balanced(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    cost: SampleCost | None,
    layout: MediaLayout,
) -> tuple[SampleLayout, _Plan | None, _Order | None]:
    """The batch read once: where its media go, the plan, and the order (None: keep it)."""
    check_microbatches(batch_size, n_microbatches)
    _refuse_prepared(batch)
    short = None
    if cost is None:
        present = present_media(batch, layout)
        fields = flat_counted_fields(layout, frozenset(present)) if present else None
        if fields is not None:
            group = _group_of(layout, fields[0])
            short = plan_flat_counted(group, fields, present, batch_size, n_microbatches)
    if short is not None:
        # Where the fields go when samples move is only needed to move them: see _moves.
        reading, plan = short
        sample_layout = SampleLayout(batch_size, layout.media_fields, pending=[reading])
    else:
        sample_layout, plan = _plan(batch, batch_size, n_microbatches, cost, layout)
    order = None if plan is None else _balanced_order(plan, n_microbatches)
    return sample_layout, plan, order


@functools.lru_cache(maxsize=64)
def _group_of(layout: MediaLayout, pixels: str) -> MediaGroup:
    """The first group of ``layout`` with these pixels (cached: layouts compare by identity)."""
    return next(group for group in layout.groups if group.pixels == pixels)


def balance_microbatches(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    *,
    cost: SampleCost | None = None,
    keys: Collection[str] | None = None,
    layout: MediaLayout = SEED_LAYOUT,
) -> torch.Tensor:
    """Permute the samples of ``batch`` so that every microbatch's vision cost is about even.

    Call it on a collated batch before ``prepare_vlm_media_for_pp`` (or call
    ``balance_and_prepare_vlm_media_for_pp``, which does both from one reading). The engine's
    rows per microbatch (``torch.tensor_split``) and the text shapes do not change; which
    samples fill them does. Every tensor with ``batch_size`` rows (input_ids, labels,
    attention_mask, ...; only those named in ``keys`` if given) is re-ordered, and the media
    follow their samples item by item: flat patches with their grid rows, per-image rows with
    ``n_images_per_sample``, one-per-sample layouts, Step3 crops, videos, per-item extras such
    as ``num_crops`` and ``second_per_grid_ts`` (``layout``: the media fields, as for
    ``prepare_vlm_media_for_pp``). This copies the media once; the later split stays
    zero-copy. Non-tensor values are not touched (re-order them with the result).

    ``cost``: each sample's cost, a ``[B]`` tensor (or sequence) or a function of the batch
    returning one; default ``media_cost_per_sample`` (patches, or images in per-image layouts).
    Deterministic: ties break by batch index, so ranks that collate the same samples agree.

    Returns ``order`` (CPU int64 ``[B]``): row j now holds sample ``order[j]`` of the given batch
    (``restore_sample_order`` maps per-sample outputs back). When balancing would not lower the
    largest microbatch cost, the batch is left as it is and ``order`` is the identity. Input that
    ``prepare_vlm_media_for_pp`` rejects raises a ``ValueError`` naming the field here too, with
    the batch unchanged.
    """
    sample_layout, plan, balanced = _balanced(batch, batch_size, n_microbatches, cost, layout)
    if balanced is None:
        return torch.arange(batch_size)
    batch.update(permuted_fields(batch, sample_layout.complete(), plan, balanced.order, keys))
    return balanced.order


def balance_and_prepare_vlm_media_for_pp(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    *,
    cost: SampleCost | None = None,
    keys: Collection[str] | None = None,
    layout: MediaLayout = SEED_LAYOUT,
) -> torch.Tensor:
    """``balance_microbatches`` then ``prepare_vlm_media_for_pp``, from one reading of the batch.

    The same result as calling the two in turn (the same order, the same chunks, the same
    errors, the batch unchanged on error), with the media validated and read on the host once
    for both. Returns ``order`` as ``balance_microbatches`` does; the batch carries the chunks
    under ``VLM_PP_MEDIA_KEY`` (when it has media). ``wrap_vlm_collate_for_pp(...,
    balance_media=True)`` calls this.
    """
    planned = _plan_balanced_split(batch, batch_size, n_microbatches, cost, layout)
    if planned is None:
        return torch.arange(batch_size)
    sample_layout, plan, order, splits = planned
    updates = {}
    if order is not None:
        updates = permuted_fields(batch, sample_layout.complete(), plan, order, keys)
    media: Chunks = {}
    for reading, item_b, pixel_b in splits:
        reading = _permuted_reading(reading, updates)
        media.update(split_group(reading, item_b, pixel_b, n_microbatches))
    batch.update(updates)
    if splits:
        for key in sample_layout.removed:
            batch.pop(key, None)
        batch[VLM_PP_MEDIA_KEY] = media
    return torch.arange(batch_size) if order is None else order


#: Each group's reading with its item and row offsets at the engine's bounds, after the order.
Splits = list[tuple[GroupReading, Sequence[int] | None, Sequence[int] | None]]


def _plan_balanced_split(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    cost: SampleCost | None,
    layout: MediaLayout,
) -> tuple[SampleLayout, _Plan, torch.Tensor | None, Splits] | None:
    """Everything but moving the data: the order, and the split offsets of the permuted batch
    from the plan's per-sample rows (no second read). None: no media and no cost."""
    sample_layout, plan, balanced = _balanced(batch, batch_size, n_microbatches, cost, layout)
    if plan is None:
        return None
    readings = [group.reading for group in sample_layout.groups] + sample_layout.pending
    order = positions = None
    if balanced is not None:
        order, positions = balanced.order, balanced.samples
    splits: Splits = []
    for index, (reading, (items, rows)) in enumerate(zip(readings, plan.group_rows, strict=True)):
        lists = isinstance(items, list) or isinstance(rows, list)
        if positions is None and order is not None and lists:
            positions = order.tolist()
        item_b = _bounds(items, order, positions, batch_size, n_microbatches)
        if index == plan.cost_group:
            # The group's rows are the costs: a microbatch's rows are its load.
            loads = plan.natural if balanced is None else balanced.loads
            pixel_b = list(itertools.accumulate(loads, initial=0))
        else:
            pixel_b = _bounds(rows, order, positions, batch_size, n_microbatches)
        splits.append((reading, item_b, pixel_b))
    return sample_layout, plan, order, splits


def _permuted_reading(reading: GroupReading, updates: dict[str, torch.Tensor]) -> GroupReading:
    """The reading over the permuted tensors (those not re-ordered stay)."""
    if not updates:
        return reading
    get = updates.get
    counts = reading.counts
    if reading.counts_given:
        counts = get(reading.counts_name, counts)
    return dataclasses.replace(
        reading,
        pixels=get(reading.group.pixels, reading.pixels),
        counts=counts,
        row_tensor=None
        if reading.row_field is None
        else get(reading.row_field, reading.row_tensor),
        item_fields=[(name, get(name, tensor)) for name, tensor in reading.item_fields],
        sample_fields=[(name, get(name, tensor)) for name, tensor in reading.sample_fields],
        per_row_fields=[(name, get(name, tensor)) for name, tensor in reading.per_row_fields],
    )


def _bounds(
    per_sample: Sequence[int] | torch.Tensor | None,
    order: torch.Tensor | None,
    positions: list[int] | None,
    batch_size: int,
    n_microbatches: int,
) -> Sequence[int] | None:
    """Offsets at the engine's sample bounds of per-sample values in the permuted order."""
    if per_sample is None:
        return None
    if isinstance(per_sample, torch.Tensor):
        values = per_sample if order is None else per_sample.index_select(0, order)
        ends = values.cumsum(0).index_select(
            0, sample_ends_tensor(batch_size, n_microbatches, values.device)
        )
        return [0, *ends.tolist()]
    values = per_sample if positions is None else list(map(per_sample.__getitem__, positions))
    sums = list(itertools.accumulate(values, initial=0))
    return operator.itemgetter(*sample_bounds(batch_size, n_microbatches))(sums)


def restore_sample_order(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-row ``values`` of a balanced batch back in the collated order; pad rows dropped.

    ``order`` is what ``balance_microbatches`` returned, or the batch's
    ``VLM_PP_SAMPLE_ORDER_KEY`` entry (-1 marks pad rows); ``values`` has one row per entry of
    ``order`` (per-sample losses, logits, ...).
    """
    order_t = require_int_tensor("order", order, 1)
    rows = require_tensor("values", values)
    _require_rows("values", rows, order_t.shape[0], "one row per entry of 'order'")
    order_t = order_t.to(rows.device)
    real = order_t >= 0
    if not bool(real.all()):
        order_t, rows = order_t[real], rows[real]
    out = torch.empty_like(rows)
    out[order_t] = rows
    return out


def record_sample_order(
    batch: MutableMapping[str, Any],
    order: torch.Tensor,
    batch_size: int,
    n_microbatches: int,
    *,
    padded: bool,
) -> None:
    """Store ``order`` under ``VLM_PP_SAMPLE_ORDER_KEY``, one entry per engine row.

    ``padded``: the batch went through ``pad_to_even_microbatches``; its pad rows get -1.
    """
    rows = {VLM_PP_SAMPLE_ORDER_KEY: order}
    if padded:
        pad_to_even_microbatches(
            rows, batch_size, n_microbatches, pad_values={VLM_PP_SAMPLE_ORDER_KEY: -1}
        )
    batch[VLM_PP_SAMPLE_ORDER_KEY] = rows[VLM_PP_SAMPLE_ORDER_KEY]
