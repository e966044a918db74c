"""Maps from samples to media rows, in two phases: plan on the device, then slice on the host.

A plan takes a group that ``reading`` has checked as far as shapes go, queues the offsets it
needs (and the values it must check) on a ``DeferredHostRead``, and returns a ``finish``
callable. After the single host read, ``finish`` checks the values and slices every field into
per-microbatch views.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pp_media._core.bounds import (
    sample_bounds,
    sample_ends_tensor,
    sample_row_counts,
)
from pp_media._core.host_read import DeferredHostRead
from pp_media._core.reading import GroupReading, flat_grid_types_fit

Chunks = dict[str, list[torch.Tensor]]
Finish = Callable[[list[list[int]]], Chunks]

#: Batches with at most this many counts plus items read their raw counts and patch sizes in the
#: one host read and sum them there: fewer tensor ops, which dominate small batches. Larger ones
#: reduce on the device first, so the read stays M-sized and Python never loops over items.
HOST_SUM_MAX = 512


def sizes_between(bounds: Sequence[int]) -> list[int]:
    """Row counts between consecutive ``bounds``."""
    return list(map(operator.sub, bounds[1:], bounds[:-1]))


def split_rows(tensor: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Views of ``tensor`` along dim 0, ``sizes[k]`` rows for microbatch k."""
    return list(tensor.split_with_sizes(sizes))


def _offsets(values: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums with the total appended: ``[0, v0, v0 + v1, ...]`` (int64)."""
    return torch.cat((_zero(values.device), values.cumsum(0)))


@functools.lru_cache(maxsize=16)
def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


def split_group(
    reading: GroupReading,
    item_b: Sequence[int] | None,
    pixel_b: Sequence[int] | None,
    n_microbatches: int,
) -> Chunks:
    """Every field of a checked group as per-microbatch views, from the item offsets at the
    engine's sample bounds (None: one item per sample) and, for flat pixels, the row offsets."""
    sample_sizes = sample_row_counts(reading.batch_size, n_microbatches)
    item_sizes = sample_sizes if item_b is None else sizes_between(item_b)
    pixel_sizes = {
        "rows": None if pixel_b is None else sizes_between(pixel_b),
        "items": item_sizes,
        "samples": sample_sizes,
    }[reading.pixel_rows]
    chunks: Chunks = {reading.group.pixels: split_rows(reading.pixels, pixel_sizes)}
    if reading.row_tensor is not None:
        chunks[reading.row_field] = split_rows(reading.row_tensor, item_sizes)
    if reading.counts_given:
        chunks[reading.counts_name] = split_rows(reading.counts, sample_sizes)
    for name, tensor in reading.item_fields:
        chunks[name] = split_rows(tensor, item_sizes)
    for name, tensor in reading.sample_fields:
        chunks[name] = split_rows(tensor, sample_sizes)
    for name, tensor in reading.per_row_fields:
        chunks[name] = split_rows(tensor, pixel_sizes)
    return chunks


def plan_media_group(
    reading: GroupReading, n_microbatches: int, reader: DeferredHostRead
) -> Finish:
    """Plan the split of one media group: queue the values the host must see, and return the
    ``finish`` that checks them and slices every field.

    Small batches read the raw counts and per-item rows and sum them on the host; larger ones
    reduce on the device first, so the read stays M-sized.
    """
    batch_size, m = reading.batch_size, n_microbatches
    counts, sizes = reading.counts, reading.sizes
    local_counts = None
    if counts is not None:
        device = sizes.device if sizes is not None else counts.device
        local_counts = counts if counts.device == device else counts.to(device)
    # Everything the host must see: counts, then per-item rows (either may be absent).
    raw = [part for part in (local_counts, sizes) if part is not None]
    n_items = 0 if sizes is None else sizes.shape[0]
    host_sums = batch_size + n_items <= HOST_SUM_MAX
    handle = None
    if raw:
        values = raw[0] if len(raw) == 1 else torch.cat(raw)
        if not host_sums:
            values = _reduce_on_device(values, local_counts, sizes, batch_size, m)
        handle = reader.add(values)

    def finish(values: list[list[int]]) -> Chunks:
        item_b: Sequence[int] | None = None
        pixel_b: Sequence[int] | None = None
        if handle is not None:
            row = values[handle]
            if host_sums:
                if row and min(row) < 0:
                    reading.raise_negative()
                if counts is not None:
                    item_b = _bounds_getter(batch_size, m)(_prefix_sums(row[:batch_size]))
                    row = row[batch_size:]
            else:
                if row[-1] < 0:
                    reading.raise_negative()
                row = row[:-1]
                if counts is not None:
                    item_b, row = (0, *row[:m]), row[m:]
            if item_b is not None:
                reading.check_counts(item_b[-1], 0)
            if sizes is not None:
                if host_sums:
                    ends = _prefix_sums(row)
                    if item_b is None:
                        pixel_b = _bounds_getter(batch_size, m)(ends)
                    else:
                        pixel_b = operator.itemgetter(*item_b)(ends)
                else:
                    # Device sums are offset by the total of the counts (see _reduce_on_device).
                    shift = item_b[-1] if counts is not None else 0
                    pixel_b = [0, *[value - shift for value in row]]
                reading.check_sizes(pixel_b[-1], 0)
        return split_group(reading, item_b, pixel_b, m)

    return finish


def _prefix_sums(values: list[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]`` on the host."""
    return list(itertools.accumulate(values, initial=0))


@functools.lru_cache(maxsize=256)
def _bounds_getter(batch_size: int, n_microbatches: int) -> operator.itemgetter:
    """Picks the values at the engine's sample bounds (M + 1 >= 2 of them: always a tuple)."""
    return operator.itemgetter(*sample_bounds(batch_size, n_microbatches))


def _reduce_on_device(
    values: torch.Tensor,
    counts: torch.Tensor | None,
    sizes: torch.Tensor | None,
    batch_size: int,
    n_microbatches: int,
) -> torch.Tensor:
    """Large batches: only the M-sized offsets and the minimum travel to the host.

    ``values`` is ``counts`` and/or ``sizes`` concatenated; one prefix sum covers both, so the
    patch sums come out offset by the total of the counts (removed on the host). Returns the
    item ends of the microbatches (with counts), the patch ends (with sizes), then the minimum.
    """
    sums = values.cumsum(0)
    ends = sample_ends_tensor(batch_size, n_microbatches, values.device)
    queued = []
    if counts is not None:
        ends = sums.index_select(0, ends)
        queued.append(ends)
    if sizes is not None:
        if counts is not None:
            # Clamped so that counts that do not sum to the grid's rows still index safely on
            # any device; finish() reports them. sums[B - 1 + e] = total counts + patches of
            # the first e items.
            ends = sums[batch_size - 1 :].index_select(0, ends.clamp(0, sizes.shape[0]))
        else:
            ends = sums.index_select(0, ends)
        queued.append(ends)
    queued.append(values.amin(0, keepdim=True))
    return torch.cat(queued)


FlatChunks = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


class FlatSums(NamedTuple):
    """The common layout read on the host: per-sample item counts, their prefix sums, and the
    prefix sums of the items' rows (``[0, s0, s0 + s1, ...]``), every check passed."""

    counts: list[int]
    item_sums: list[int]
    patch_sums: list[int]
    #: Rows of each item (``prod(grid, dim=1)``).
    sizes: torch.Tensor


def flat_counted_fits(pixels: object, grid: object, counts: object, batch_size: int) -> bool:
    """Whether flat pixels, a grid and per-sample counts take the common layout's short paths
    (types, ranks, dtypes, ``[B]`` counts, flat pixels)."""
    return (
        flat_grid_types_fit(pixels, grid, counts)
        and counts.shape[0] == batch_size
        and pixels.shape[0] != grid.shape[0]
    )


def flat_counted_sums(
    pixels: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor, batch_size: int
) -> FlatSums | None:
    """The common layout's one host read for a small batch (``flat_counted_fits``): the raw
    counts and patch sizes, summed on the host. The split and the balancing plan both read the
    batch here. None for a bad value (the general path names the field)."""
    sizes = grid.prod(dim=1)
    row = torch.cat((counts, sizes)).tolist()
    if min(row) < 0:
        return None
    counts_row = row[:batch_size]
    item_sums = list(itertools.accumulate(counts_row, initial=0))
    patch_sums = list(itertools.accumulate(row[batch_size:], initial=0))
    if item_sums[-1] != grid.shape[0] or patch_sums[-1] != pixels.shape[0]:
        return None
    return FlatSums(counts_row, item_sums, patch_sums, sizes)


def split_flat_counted(
    pixels: object, grid: object, counts: object, batch_size: int, n_microbatches: int
) -> FlatChunks | None:
    """Fast path for the common layout: flat patches, a 2-D grid, per-sample counts.

    Skips the general plan's per-call machinery (the small batches people train with are
    dominated by it) but not its checks: it returns the pixel, grid and count chunks only for
    input that ``plan_media_group`` accepts too, with the same chunks, and None for anything
    else (another type, dtype, shape or device, a bad value), which the caller then passes to
    ``plan_media_group`` to split or to reject with the message naming the field. One host
    read; a rejected bad batch costs a second one, on the error path only.
    """
    if not flat_counted_fits(pixels, grid, counts, batch_size):
        return None
    n_items = grid.shape[0]
    m = n_microbatches
    if batch_size + n_items <= HOST_SUM_MAX:
        sums = flat_counted_sums(pixels, grid, counts, batch_size)
        if sums is None:
            return None
        item_b = _bounds_getter(batch_size, m)(sums.item_sums)
        pixel_b = operator.itemgetter(*item_b)(sums.patch_sums)
    else:
        sizes = grid.prod(dim=1)
        values = torch.cat((counts, sizes))
        row = _reduce_on_device(values, counts, sizes, batch_size, m).tolist()
        # Patch ends come offset by the total of the counts, row[m - 1] (_reduce_on_device).
        n_rows = pixels.shape[0]
        if row[-1] < 0 or row[m - 1] != n_items or row[2 * m - 1] - n_items != n_rows:
            return None
        item_b = [0, *row[:m]]
        pixel_b = [0, *map(operator.sub, row[m : 2 * m], itertools.repeat(n_items, m))]
    return (
        list(pixels.split_with_sizes(sizes_between(pixel_b))),
        list(grid.split_with_sizes(sizes_between(item_b))),
        list(counts.split_with_sizes(sample_row_counts(batch_size, m))),
    )
