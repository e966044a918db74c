"""Maps from samples to media rows, in two phases: plan on the device, then slice on the host.

A plan validates what it can from shapes alone, queues the offsets it needs (and the values it
must check) on a ``DeferredHostRead``, and returns a ``finish`` callable. After the single host
read, ``finish`` checks the values and slices every field into per-microbatch views.
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
    sample_bounds_tensor,
    sample_ends_tensor,
    sample_row_counts,
)
from pp_media._core.errors import media_error, require_int_tensor, require_tensor
from pp_media._core.host_read import DeferredHostRead

Chunks = dict[str, list[torch.Tensor]]
Finish = Callable[[list[list[int]]], Chunks]

#: Batches with at most this many counts plus items read their raw counts and patch sizes in the
#: one host read and sum them there: fewer tensor ops, which dominate small batches. Larger ones
#: reduce on the device first, so the read stays M-sized and Python never loops over items.
HOST_SUM_MAX = 512

#: The grid that flat patches of a pixel field are described by, named when it is missing.
_GRID_OF = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}


def _missing_grid_hint(group: MediaGroup) -> str:
    """Counts that miss the rows of a grid-less group often mean flat patches lost their grid."""
    if group.grid_name is not None or group.pixels_name not in _GRID_OF:
        return ""
    return f" Flat patches need their grid beside them ('{_GRID_OF[group.pixels_name]}')."


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


def _require_rows(field: str, tensor: torch.Tensor, rows: int, meaning: str, fix: str = "") -> None:
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise media_error(field, tensor, f"dim 0 of size {rows} ({meaning})", fix)


def _raise_negative(group: MediaGroup, counts: torch.Tensor | None, grid: torch.Tensor) -> None:
    """Name the field with a negative entry (error path: an extra host read is fine here)."""
    if counts is not None and int(counts.min()) < 0:
        raise media_error(
            group.counts_name,
            counts,
            "non-negative item counts",
            f"Its minimum is {int(counts.min())}.",
        )
    raise media_error(group.grid_name, grid, "non-negative grid entries")


class MediaGroup(NamedTuple):
    """One media group of a batch: a pixel tensor, its per-item grid, per-sample counts.

    Without a grid, dim 0 of the pixel tensor counts items (one row per image).
    """

    pixels_name: str
    pixels: object
    grid_name: str | None
    grid: object | None
    counts_name: str
    counts: object | None
    extra_rows: tuple[tuple[str, object], ...] = ()


def plan_media_group(
    group: MediaGroup, batch_size: int, n_microbatches: int, reader: DeferredHostRead
) -> Finish:
    """Plan the split of an image or video group (grid-described media).

    Dim 0 of the pixel tensor counts either items (one row per image/video: per-image
    layouts) or patches (flat layouts, patches of item i = product of grid row i).
    """
    pixels = require_tensor(group.pixels_name, group.pixels)
    if pixels.dim() == 0:
        raise media_error(group.pixels_name, pixels, "at least one dimension")
    # Per-image layouts only split the grid by rows (Gemma's position ids are [n, P, 2]);
    # flat layouts also need each row's patch count, checked below.
    grid = None
    if group.grid_name is not None:
        grid = require_tensor(group.grid_name, group.grid)
        if grid.dim() < 2 or grid.dtype.is_floating_point or grid.dtype == torch.bool:
            raise media_error(
                group.grid_name,
                grid,
                "a 2-D integer tensor with one row per item (per-image layouts also accept "
                "more dims, such as Gemma's [n_images, P, 2] image_position_ids)",
            )
    items_name = group.grid_name or group.pixels_name
    items = grid if grid is not None else pixels
    n_items = items.shape[0]
    extra_rows = [(name, require_tensor(name, value)) for name, value in group.extra_rows]
    for name, tensor in extra_rows:
        _require_rows(name, tensor, n_items, f"one row per row of '{items_name}'")

    counts = None
    if group.counts is not None:
        counts = require_int_tensor(group.counts_name, group.counts, 1)
        _require_rows(group.counts_name, counts, batch_size, "one count per sample")
    elif n_items != batch_size:
        raise media_error(
            items_name,
            items,
            f"{batch_size} rows (one item per sample) when '{group.counts_name}' is not given",
            f"The batch has {batch_size} samples and {n_items} items: pass "
            f"'{group.counts_name}' (shape [{batch_size}]) with each sample's item count.",
        )

    per_item = pixels.shape[0] == n_items
    if not per_item and grid.dim() != 2:
        raise media_error(
            group.grid_name,
            grid,
            f"a 2-D integer tensor (one patch-grid row per item) for the flat "
            f"'{group.pixels_name}' of shape {tuple(pixels.shape)}",
            f"Or give '{group.pixels_name}' one row per item ({n_items} rows).",
        )

    m = n_microbatches
    sizes = None if per_item else grid.prod(dim=1)
    local_counts = None
    if counts is not None:
        local_counts = counts if counts.device == items.device else counts.to(items.device)
    # Everything the host must see: counts, then per-item patch counts (either may be absent).
    raw = [part for part in (local_counts, sizes) if part is not None]
    host_sums = batch_size + n_items <= HOST_SUM_MAX
    handle = None
    if raw:
        values = raw[0] if len(raw) == 1 else torch.cat(raw)
        if not host_sums:
            values = _reduce_on_device(values, local_counts, sizes, batch_size, m)
        handle = reader.add(values)

    def finish(values: list[list[int]]) -> Chunks:
        bounds = sample_bounds(batch_size, m)
        sample_sizes = sample_row_counts(batch_size, m)
        item_b: Sequence[int] = bounds
        pixel_b: Sequence[int] = ()
        if handle is not None:
            row = values[handle]
            if host_sums:
                if min(row) < 0:
                    _raise_negative(group, counts, items)
                if counts is not None:
                    item_b = _bounds_getter(batch_size, m)(_prefix_sums(row[:batch_size]))
                    row = row[batch_size:]
            else:
                if row[-1] < 0:
                    _raise_negative(group, counts, items)
                row = row[:-1]
                if counts is not None:
                    item_b, row = (0, *row[:m]), row[m:]
            if item_b[-1] != n_items:
                raise media_error(
                    group.counts_name,
                    counts,
                    f"counts that sum to {n_items}, the rows of '{items_name}' "
                    f"(shape {tuple(items.shape)})",
                    f"They sum to {item_b[-1]}." + _missing_grid_hint(group),
                )
            if not per_item:
                if host_sums:
                    pixel_b = operator.itemgetter(*item_b)(_prefix_sums(row))
                else:
                    # Device sums are offset by the total of the counts (see _reduce_on_device).
                    shift = item_b[-1] if counts is not None else 0
                    pixel_b = [0, *[value - shift for value in row]]
                if pixel_b[-1] != pixels.shape[0]:
                    raise media_error(
                        group.pixels_name,
                        pixels,
                        f"dim 0 of size {pixel_b[-1]}: the patches described by "
                        f"'{group.grid_name}' (shape {tuple(grid.shape)}, sum over rows of the "
                        f"row product), or {n_items}: one row per item",
                        "Check that the grid belongs to these pixel values.",
                    )
        item_sizes = sample_sizes if counts is None else sizes_between(item_b)
        pixel_sizes = item_sizes if per_item else sizes_between(pixel_b)
        chunks: Chunks = {group.pixels_name: split_rows(pixels, pixel_sizes)}
        if grid is not None:
            chunks[group.grid_name] = split_rows(grid, item_sizes)
        if counts is not None:
            chunks[group.counts_name] = split_rows(counts, sample_sizes)
        for name, tensor in extra_rows:
            chunks[name] = split_rows(tensor, item_sizes)
        return chunks

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


#: Integer dtypes the fast path accepts (the general path also takes other non-float ones).
_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})

FlatChunks = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


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
    if not (
        isinstance(pixels, torch.Tensor)
        and isinstance(grid, torch.Tensor)
        and isinstance(counts, torch.Tensor)
        and grid.dim() == 2
        and counts.dim() == 1
        and pixels.dim() != 0
        and grid.dtype in _INT_DTYPES
        and counts.dtype in _INT_DTYPES
        and counts.device == grid.device
    ):
        return None
    n_items = grid.shape[0]
    n_rows = pixels.shape[0]
    if counts.shape[0] != batch_size or n_rows == n_items:
        return None
    m = n_microbatches
    sizes = grid.prod(dim=1)
    values = torch.cat((counts, sizes))
    if batch_size + n_items <= HOST_SUM_MAX:
        row = values.tolist()
        if min(row) < 0:
            return None
        item_sums = list(itertools.accumulate(row[:batch_size], initial=0))
        patch_sums = list(itertools.accumulate(row[batch_size:], initial=0))
        if item_sums[-1] != n_items or patch_sums[-1] != n_rows:
            return None
        item_b = _bounds_getter(batch_size, m)(item_sums)
        pixel_b = operator.itemgetter(*item_b)(patch_sums)
    else:
        row = _reduce_on_device(values, counts, sizes, batch_size, m).tolist()
        # Patch ends come offset by the total of the counts, row[m - 1] (_reduce_on_device).
        if row[-1] < 0 or row[m - 1] != n_items or row[2 * m - 1] - n_items != n_rows:
            return None
        item_b = [0, *row[:m]]
        pixel_b = [0, *map(operator.sub, row[m : 2 * m], itertools.repeat(n_items, m))]
    return (
        list(pixels.split_with_sizes(sizes_between(pixel_b))),
        list(grid.split_with_sizes(sizes_between(item_b))),
        list(counts.split_with_sizes(sample_row_counts(batch_size, m))),
    )


def plan_patch_mapped(
    pixel_values: object,
    batch_size: int,
    n_microbatches: int,
    reader: DeferredHostRead,
    num_patches: object | None = None,
    patch_pixel_values: object | None = None,
    patch_newline_mask: object | None = None,
) -> Finish:
    """Plan the Step3-style split: per-sample images plus crops mapped by ``num_patches``.

    ``pixel_values`` is either one image per sample (dim 0 == batch size) or itself a flat
    crop tensor with ``sum(num_patches)`` rows.
    """
    pixels = require_tensor("pixel_values", pixel_values)
    if pixels.dim() == 0:
        raise media_error("pixel_values", pixels, "at least one dimension")
    if num_patches is None:
        counts = torch.zeros(batch_size, dtype=torch.int64, device=pixels.device)
    else:
        counts = require_int_tensor("num_patches", num_patches, 1)
        _require_rows("num_patches", counts, batch_size, "one crop count per sample")
    crops = (
        None
        if patch_pixel_values is None
        else require_tensor("patch_pixel_values", patch_pixel_values)
    )
    newline = (
        None
        if patch_newline_mask is None
        else require_tensor("patch_newline_mask", patch_newline_mask)
    )
    for name, tensor in (("patch_pixel_values", crops), ("patch_newline_mask", newline)):
        if tensor is not None and tensor.dim() == 0:
            raise media_error(name, tensor, "at least one dimension")
    flat_pixels = pixels.shape[0] != batch_size

    samples = sample_bounds_tensor(batch_size, n_microbatches, counts.device)
    handle = reader.add(
        torch.cat([_offsets(counts).index_select(0, samples), counts.min().view(1)])
    )
    m1 = n_microbatches + 1

    def finish(values: list[list[int]]) -> Chunks:
        patch_b, count_min = values[handle][:m1], values[handle][m1]
        total = patch_b[-1]
        if count_min < 0:
            raise media_error(
                "num_patches", counts, "non-negative crop counts", f"Its minimum is {count_min}."
            )
        expected = f"dim 0 of size {total}, the sum of 'num_patches'"
        if flat_pixels and pixels.shape[0] != total:
            raise media_error(
                "pixel_values",
                pixels,
                f"dim 0 of size {batch_size} (one image per sample) or {total} (the sum of "
                "'num_patches', a flat crop tensor)",
            )
        for name, tensor in (("patch_pixel_values", crops), ("patch_newline_mask", newline)):
            if tensor is not None and tensor.shape[0] != total:
                raise media_error(name, tensor, expected)
        sample_sizes = sample_row_counts(batch_size, n_microbatches)
        patch_sizes = sizes_between(patch_b)
        chunks: Chunks = {
            "pixel_values": split_rows(pixels, patch_sizes if flat_pixels else sample_sizes),
            "num_patches": split_rows(counts, sample_sizes),
        }
        if crops is not None:
            chunks["patch_pixel_values"] = split_rows(crops, patch_sizes)
        if newline is not None:
            chunks["patch_newline_mask"] = split_rows(newline, patch_sizes)
        return chunks

    return finish


def plan_per_sample(name: str, value: object, batch_size: int, n_microbatches: int) -> Finish:
    """Plan the split of a tensor that already has one row per sample."""
    tensor = require_tensor(name, value)
    _require_rows(name, tensor, batch_size, "one row per sample")

    def finish(values: list[list[int]]) -> Chunks:
        return {name: split_rows(tensor, sample_row_counts(batch_size, n_microbatches))}

    return finish
