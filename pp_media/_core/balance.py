"""Media-balanced microbatches: permute a batch's samples so every microbatch's vision cost is even.

The engine's microbatch k takes rows ``[b[k], b[k + 1])`` of every tensor (``bounds.py``); those
sizes stay. What changes is which samples sit in which rows: ``balance_microbatches`` chooses a
permutation of the samples that evens out the per-microbatch cost (patches by default), then
re-orders every per-sample tensor and, item by item, the media that follow their samples. It runs
before ``prepare_vlm_media_for_pp``, whose split of the permuted tensors stays zero-copy.

Assignment (cardinality-constrained LPT, dealt "by rounds"): the samples sorted by cost, largest
first (ties: lower batch index first), are dealt in rounds of M, one to each microbatch, the
largest of a round to the least-loaded microbatch (ties: lower id). Once a round's largest cost is
at most ``1 / _HEAD_ROUNDS`` of the mean microbatch load, the remaining rounds are dealt in one
vectorised boustrophedon (forward, backward, ...) over the microbatches ordered by load; that
moves a microbatch's load by at most the largest remaining cost, and bounds the rounds dealt one
by one to ``_HEAD_ROUNDS``. Every microbatch ends with ``B // M`` or ``B // M + 1`` samples; the
fuller ones take the first positions, as ``torch.tensor_split`` requires, and each keeps its
samples in batch order. If the batch order's largest microbatch cost is already no larger, the
batch is left as it is (nothing is copied).

Cost: one host read per batch. Small batches read their metadata (counts, patches per item) and
plan in Python, which takes fewer tensor ops; larger ones plan with tensor ops and read only the
check values, the batch order's microbatch loads and the costs of the rounds dealt in Python
(on an accelerator, the sorted costs and their sample indices come back in the same copy).
Applying the permutation then copies every re-ordered tensor once (``index_select``) after
sending the order (and the media's row index) to the media's device.
"""

from __future__ import annotations

import array
import functools
import itertools
import math
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from operator import add, mul, sub
from typing import Any, NamedTuple

import torch

from pp_media._core.bounds import sample_bounds, sample_ends_tensor
from pp_media._core.errors import (
    check_microbatches,
    media_error,
    require_int_tensor,
    require_tensor,
)
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._keys import (
    _VLM_MEDIA_KEYS,
    IMAGE_GRID_KEYS,
    IMAGE_ROW_KEYS,
    VIDEO_ROW_KEYS,
    VLM_PP_MEDIA_KEY,
)

#: Batch key under which ``wrap_vlm_collate_for_pp(..., balance_media=...)`` records the order:
#: an int64 tensor with one entry per row the engine splits, ``order[j]`` = index in the collated
#: batch of the sample at row j, -1 for pad rows. Not a model input: give the engine only the
#: text fields (``VLMPipeline.step`` reads only those).
VLM_PP_SAMPLE_ORDER_KEY = "_vlm_pp_sample_order"

#: A per-sample cost: a ``[B]`` tensor (or sequence), or a function of the batch returning one.
SampleCost = torch.Tensor | Callable[[Mapping[str, Any]], Any]

#: Rounds dealt one by one at most (the rest in one boustrophedon; see the module docstring).
#: Measured against dealing every round one by one: the largest microbatch cost comes out at
#: most 3% higher (mean 0.5%) over uniform, long-tailed, log-normal and mixed costs.
_HEAD_ROUNDS = 16
#: Up to this many microbatches a round is dealt in Python, above it with tensor ops.
_PYTHON_ROUND_MAX = 128
#: Batches with at most this many samples plus metadata entries plan in Python.
_HOST_PLAN_MAX = 512

_STEP3_KEYS = ("num_patches", "patch_pixel_values", "patch_newline_mask")

#: Raises on a (sum, minimum) that the core would reject.
Check = Callable[[int, int], None]


class _Counted(NamedTuple):
    """A 1-D int64 tensor (counts, grid sizes) whose sum and minimum ``check`` validates."""

    values: torch.Tensor
    check: Check


class _Flat(NamedTuple):
    """Flat patches: item i has ``counted[sizes].values[i]`` rows; sample s owns
    ``counted[counts].values[s]`` consecutive items (one each when ``counts`` is None)."""

    sizes: int
    counts: int | None


#: Per-sample rows: "ones", ("counted", i): the values of ``counted[i]``, or ("flat", i): the
#: patches of ``flats[i]``.
Rows = str | tuple[str, int]


@dataclass
class _Layout:
    """How the media of a batch hang off its samples, and what must hold before moving them."""

    batch_size: int
    counted: list[_Counted] = field(default_factory=list)
    flats: list[_Flat] = field(default_factory=list)
    #: Media fields with one row per sample: ``index_select(order)``.
    per_sample: list[str] = field(default_factory=list)
    #: (rows per sample, fields whose rows follow the samples in batch order).
    segments: list[tuple[Rows, list[str]]] = field(default_factory=list)
    #: Rows of each sample in each pixel tensor: their sum is the default cost.
    cost_rows: list[Rows] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)

    def count(self, values: torch.Tensor, check: Check) -> int:
        """Record a 1-D int64 tensor to check after the read; returns its index."""
        self.counted.append(_Counted(values, check))
        return len(self.counted) - 1


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(device, dtype)``, skipping the call (a few microseconds) when it is a no-op."""
    if tensor.device == device and tensor.dtype == dtype:
        return tensor
    return tensor.to(device=device, dtype=dtype)


def _is_host(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` costs no device synchronisation."""
    return device.type == "cpu"


def _require_rows(field: str, tensor: torch.Tensor, rows: int, meaning: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise media_error(field, tensor, f"dim 0 of size {rows} ({meaning})")


def _plan_group(
    layout: _Layout,
    present: Mapping[str, Any],
    pixels_name: str,
    grid_name: str | None,
    counts_name: str,
    extra_names: list[str],
) -> None:
    """A grid-described group (flat patches or one row per item), read as the core reads it."""
    b = layout.batch_size
    pixels = require_tensor(pixels_name, present[pixels_name])
    if pixels.dim() == 0:
        raise media_error(pixels_name, pixels, "at least one dimension")
    grid = None
    if grid_name is not None:
        grid = require_tensor(grid_name, present[grid_name])
        if grid.dim() < 2 or grid.dtype.is_floating_point or grid.dtype == torch.bool:
            raise media_error(grid_name, grid, "a 2-D integer tensor with one row per item")
    items_name = grid_name or pixels_name
    items = grid if grid is not None else pixels
    n_items = items.shape[0]
    extras = [(name, require_tensor(name, present[name])) for name in extra_names]
    for name, tensor in extras:
        _require_rows(name, tensor, n_items, f"one row per row of '{items_name}'")
    counts = None
    if present.get(counts_name) is not None:
        counts = require_int_tensor(counts_name, present[counts_name], 1)
        _require_rows(counts_name, counts, b, "one count per sample")
    elif n_items != b:
        raise media_error(
            items_name,
            items,
            f"{b} rows (one item per sample) when '{counts_name}' is not given",
            f"Pass '{counts_name}' (shape [{b}]) with each sample's item count.",
        )
    per_item = pixels.shape[0] == n_items
    if not per_item and grid.dim() != 2:
        raise media_error(
            grid_name,
            grid,
            f"a 2-D integer tensor (one patch-grid row per item) for the flat '{pixels_name}' "
            f"of shape {tuple(pixels.shape)}",
        )

    item_fields = [pixels_name] if per_item else []
    item_fields += [grid_name] if grid_name is not None else []
    item_fields += [name for name, _ in extras]
    layout.consumed |= {pixels_name, counts_name, *item_fields}
    counts_index = None
    if counts is None:
        # One item per sample: the item fields are per-sample rows.
        layout.per_sample += item_fields
        if per_item:
            layout.cost_rows.append("ones")
    else:

        def check_counts(total: int, minimum: int) -> None:
            if minimum < 0:
                raise media_error(
                    counts_name, counts, "non-negative item counts", f"Its minimum is {minimum}."
                )
            if total != n_items:
                raise media_error(
                    counts_name,
                    counts,
                    f"counts that sum to {n_items}, the rows of '{items_name}' "
                    f"(shape {tuple(items.shape)})",
                    f"They sum to {total}.",
                )

        counts_index = layout.count(_to(counts, items.device, torch.int64), check_counts)
        layout.per_sample.append(counts_name)
        layout.segments.append((("counted", counts_index), item_fields))
        if per_item:
            layout.cost_rows.append(("counted", counts_index))
    if per_item:
        return

    def check_patches(total: int, minimum: int) -> None:
        if minimum < 0:
            raise media_error(grid_name, grid, "non-negative grid entries")
        if total != pixels.shape[0]:
            raise media_error(
                pixels_name,
                pixels,
                f"dim 0 of size {total}: the patches described by '{grid_name}' "
                f"(shape {tuple(grid.shape)}, sum over rows of the row product), or "
                f"{n_items}: one row per item",
                "Check that the grid belongs to these pixel values.",
            )

    sizes_index = layout.count(grid.prod(dim=1), check_patches)
    layout.flats.append(_Flat(sizes_index, counts_index))
    rows = ("flat", len(layout.flats) - 1)
    layout.segments.append((rows, [pixels_name]))
    layout.cost_rows.append(rows)


def _plan_step3(layout: _Layout, present: Mapping[str, Any]) -> None:
    """Step3-style: one image per sample (or flat crops) plus crops mapped by ``num_patches``."""
    b = layout.batch_size
    pixels = require_tensor("pixel_values", present["pixel_values"])
    if pixels.dim() == 0:
        raise media_error("pixel_values", pixels, "at least one dimension")
    given = present.get("num_patches") is not None
    if given:
        counts = require_int_tensor("num_patches", present["num_patches"], 1)
        _require_rows("num_patches", counts, b, "one crop count per sample")
    else:
        counts = torch.zeros(b, dtype=torch.int64, device=pixels.device)
    crops = []
    for name in ("patch_pixel_values", "patch_newline_mask"):
        if present.get(name) is not None:
            tensor = require_tensor(name, present[name])
            if tensor.dim() == 0:
                raise media_error(name, tensor, "at least one dimension")
            crops.append((name, tensor))
    if present.get("n_images_per_sample") is not None:
        images = require_tensor("n_images_per_sample", present["n_images_per_sample"])
        _require_rows("n_images_per_sample", images, b, "one row per sample")
        layout.per_sample.append("n_images_per_sample")
    layout.consumed |= {"pixel_values", "n_images_per_sample", *_STEP3_KEYS}
    flat = pixels.shape[0] != b

    def check_crops(total: int, minimum: int) -> None:
        if minimum < 0:
            raise media_error(
                "num_patches", counts, "non-negative crop counts", f"Its minimum is {minimum}."
            )
        if flat and pixels.shape[0] != total:
            raise media_error(
                "pixel_values",
                pixels,
                f"dim 0 of size {b} (one image per sample) or {total} (the sum of "
                "'num_patches', a flat crop tensor)",
            )
        for name, tensor in crops:
            if tensor.shape[0] != total:
                raise media_error(name, tensor, f"dim 0 of size {total}, the sum of 'num_patches'")

    rows = ("counted", layout.count(_to(counts, counts.device, torch.int64), check_crops))
    if given:
        layout.per_sample.append("num_patches")
    segment = ["pixel_values"] if flat else []
    segment += [name for name, _ in crops]
    if segment:
        layout.segments.append((rows, segment))
    if not flat:
        layout.per_sample.append("pixel_values")
    layout.cost_rows.append(rows if flat else "ones")
    if "patch_pixel_values" in segment:
        layout.cost_rows.append(rows)


def _plan_layout(batch: Mapping[str, Any], batch_size: int) -> _Layout:
    """Check shapes the way ``prepare_vlm_media_for_pp`` does; values are checked after the read."""
    layout = _Layout(batch_size)
    present = {key: value for key in _VLM_MEDIA_KEYS if (value := batch.get(key)) is not None}
    if not present:
        return layout
    present.update(
        (key, batch[key])
        for key in (*IMAGE_ROW_KEYS, *VIDEO_ROW_KEYS)
        if batch.get(key) is not None
    )
    if "pixel_values" in present:
        grids = [key for key in IMAGE_GRID_KEYS if key in present]
        rows = [key for key in IMAGE_ROW_KEYS if key in present]
        if grids or not any(key in present for key in _STEP3_KEYS):
            layout.consumed |= set(rows)
            _plan_group(
                layout,
                present,
                "pixel_values",
                grids[0] if grids else None,
                "n_images_per_sample",
                [*grids[1:], *rows],
            )
        else:
            _plan_step3(layout, present)
    if "pixel_values_videos" in present:
        rows = [key for key in VIDEO_ROW_KEYS if key in present]
        layout.consumed |= set(rows)
        grid = "video_grid_thw" if "video_grid_thw" in present else None
        _plan_group(layout, present, "pixel_values_videos", grid, "n_videos_per_sample", rows)
    for key in _VLM_MEDIA_KEYS:
        if key in present and key not in layout.consumed:
            if key in ("video_grid_thw", "n_videos_per_sample"):
                needs = "'pixel_values_videos'"
            elif key in _STEP3_KEYS:
                needs = "'pixel_values' and no image grid (Step3-style crops)"
            else:
                needs = "'pixel_values'"
            raise media_error(
                key,
                present[key],
                f"to come with {needs}",
                "Without it there is nothing to align this field with; drop it or keep its media.",
            )
    return layout


def _user_cost(cost: SampleCost, batch: Mapping[str, Any], batch_size: int) -> torch.Tensor:
    value = cost(batch) if callable(cost) else cost
    expected = f"a 1-D real tensor of {batch_size} finite, non-negative per-sample costs"
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise media_error("cost", value, expected) from None
    if tensor.shape != (batch_size,) or tensor.dtype == torch.bool or tensor.dtype.is_complex:
        raise media_error("cost", tensor, expected)
    return tensor


class _Plan(NamedTuple):
    """What the deal needs on the host. Small batches: every sorted cost, as a list. Large
    ones: the sorted costs stay a (CPU) tensor; the host gets how many rounds to deal one by
    one and, when those run in Python, their costs."""

    #: Sample index of each sorted position.
    by_cost: list[int] | torch.Tensor
    #: Costs sorted largest first: a list (small batches) or a CPU tensor.
    sorted_costs: list[float] | torch.Tensor
    #: Rounds to deal one by one and their costs (large batches; None: decide from the list).
    head_rounds: int | None
    head_costs: list[float] | None
    #: Cost of each microbatch in batch order.
    natural: list[float]
    #: Per-sample patches of each flat group (tensors, or host lists for small batches).
    patches: list[torch.Tensor] | list[list[int]]
    #: Integer costs (Python ints on the host, int64 tensors), else floats.
    integer: bool


def _int64_tensor(values: list[int]) -> torch.Tensor:
    """``torch.tensor(values)`` for ints, read from a buffer: several times faster. The tensor
    shares the buffer and cannot be resized: hand out only tensors computed from it."""
    if not values:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def _list_tensor(values: list, integer: bool) -> torch.Tensor:
    """``torch.tensor(values)`` of a non-empty list of ints (int64) or floats (default dtype)."""
    if integer:
        return _int64_tensor(values)
    floats = torch.frombuffer(array.array("d", values), dtype=torch.float64)
    return floats.to(torch.get_default_dtype())


def _sum_and_min(values: torch.Tensor) -> torch.Tensor:
    """``[sum, min]`` of a 1-D int64 tensor (``[0, 0]`` when empty)."""
    if values.numel() == 0:
        return values.new_zeros(2)
    return torch.stack((values.sum(), values.min()))


def _zero_prefixed_ends(values: torch.Tensor) -> torch.Tensor:
    return torch.cat((values.new_zeros(1), values.cumsum(0)))


def _flat_patches_tensor(entries: list[torch.Tensor], flat: _Flat) -> torch.Tensor:
    sizes = entries[flat.sizes]
    if flat.counts is None:
        return sizes
    counts = entries[flat.counts]
    # Clamped so that bad counts index safely; their check reports them first.
    items = _zero_prefixed_ends(counts).clamp_(0, sizes.numel())
    return torch.diff(_zero_prefixed_ends(sizes).index_select(0, items))


def _rows_tensor(
    layout: _Layout, rows: Rows, entries: list[torch.Tensor], patches: list[torch.Tensor]
) -> torch.Tensor:
    if rows == "ones":
        return torch.ones(layout.batch_size, dtype=torch.int64)
    kind, index = rows
    return entries[index] if kind == "counted" else patches[index]


def _plan_on_device(layout: _Layout, user: torch.Tensor | None, m: int) -> _Plan:
    """Tensor ops, then one host read of the check values, the batch order's microbatch loads,
    the extreme costs and the rounds to deal one by one (with their costs if M is small)."""
    b = layout.batch_size
    entries = [counted.values for counted in layout.counted]
    patches = [_flat_patches_tensor(entries, flat) for flat in layout.flats]
    if user is None:
        costs = _rows_tensor(layout, layout.cost_rows[0], entries, patches)
        for rows in layout.cost_rows[1:]:
            row = _rows_tensor(layout, rows, entries, patches)
            costs = costs + _to(row, costs.device, costs.dtype)
    else:
        costs = user
    device = costs.device
    dtype = torch.float64 if costs.dtype.is_floating_point else torch.int64
    sorted_costs, by_cost = torch.sort(costs, descending=True, stable=True)
    ends = costs.cumsum(0).index_select(0, sample_ends_tensor(b, m, device))
    # Rounds whose largest cost exceeds 1 / _HEAD_ROUNDS of the mean load (see _deal).
    head = (sorted_costs[::m][:_HEAD_ROUNDS] * (m * _HEAD_ROUNDS) > ends[-1]).sum()
    parts = [_sum_and_min(values) for values in entries]
    parts += [ends, sorted_costs[:1], sorted_costs[-1:], head.view(1)]
    python_rounds = m <= _PYTHON_ROUND_MAX
    if python_rounds:
        parts.append(sorted_costs[: _HEAD_ROUNDS * m])
    packed = torch.cat([_to(part, device, dtype) for part in parts])
    n_values = packed.numel()
    if _is_host(device):
        sorted_cpu = _to(sorted_costs, device, dtype)
    else:
        # The sorted costs and their sample indices travel in the same copy: one sync, not three.
        tail = (sorted_costs.to(dtype), by_cost.to(dtype))
        packed = torch.cat((packed, *tail)).cpu()
        sorted_cpu = packed[n_values : n_values + b]
        by_cost = packed[n_values + b :].to(torch.int64)
    values = packed[:n_values].tolist()
    for index, counted in enumerate(layout.counted):
        counted.check(int(values[2 * index]), int(values[2 * index + 1]))
    start = 2 * len(layout.counted)
    natural_ends = values[start : start + m]
    largest, smallest, head_rounds = values[start + m : start + m + 3]
    if not (math.isfinite(largest) and smallest >= 0):
        raise media_error("cost", costs, f"{b} finite, non-negative per-sample costs")
    head_end = min(b, int(head_rounds) * m)
    head_costs = values[start + m + 3 : start + m + 3 + head_end] if python_rounds else None
    natural = [
        end - begin for begin, end in zip([0, *natural_ends[:-1]], natural_ends, strict=True)
    ]
    integer = dtype == torch.int64
    return _Plan(by_cost, sorted_cpu, int(head_rounds), head_costs, natural, patches, integer)


def _plan_on_host(layout: _Layout, user: torch.Tensor | None, m: int) -> _Plan:
    """One host read of the metadata (and user costs), then everything in Python."""
    b = layout.batch_size
    integer = user is None or not user.dtype.is_floating_point
    tensors = [counted.values for counted in layout.counted]
    if user is not None:
        tensors.append(user)
    dtype = torch.int64 if integer else torch.float64
    values: list = []
    if tensors:
        parts = [_to(tensor, tensors[0].device, dtype) for tensor in tensors]
        values = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
    lists: list[list[int]] = []
    start = 0
    for counted in layout.counted:
        stop = start + counted.values.shape[0]
        entries = values[start:stop]
        if not integer:
            entries = [int(v) for v in entries]
        counted.check(sum(entries), min(entries, default=0))
        lists.append(entries)
        start = stop
    patches: list[list[int]] = []
    for flat in layout.flats:
        sizes = lists[flat.sizes]
        if flat.counts is None:
            patches.append(sizes)
            continue
        ends = list(itertools.accumulate(sizes, initial=0))
        item_ends = list(map(ends.__getitem__, itertools.accumulate(lists[flat.counts], initial=0)))
        patches.append(list(map(sub, item_ends[1:], item_ends)))
    if user is None:
        rows_lists = [
            [1] * b if rows == "ones" else (lists if rows[0] == "counted" else patches)[rows[1]]
            for rows in layout.cost_rows
        ]
        costs: list = rows_lists[0]
        for row in rows_lists[1:]:
            costs = list(map(add, costs, row))
    else:
        costs = values[start:]
        if not all(map(math.isfinite, costs)) or min(costs) < 0:
            raise media_error("cost", user, f"{b} finite, non-negative per-sample costs")
    by_cost = sorted(range(b), key=costs.__getitem__, reverse=True)
    bounds = sample_bounds(b, m)
    natural = list(map(sum, map(costs.__getitem__, map(slice, bounds, bounds[1:]))))
    sorted_costs = list(map(costs.__getitem__, by_cost))
    return _Plan(by_cost, sorted_costs, None, None, natural, patches, integer)


class _Dealt(NamedTuple):
    """LPT by rounds over the sorted costs."""

    #: Microbatch (bin id) of each sorted position dealt one by one.
    head: list[int] | torch.Tensor
    #: Bin ids by ascending load after the head: the boustrophedon's order.
    ranked: list[int]
    #: Sorted positions dealt in the boustrophedon (the last ones).
    tail: int
    #: Bins that take a sample in the last, partial round (they hold ``B // M + 1``).
    fuller: set[int]
    max_load: float


def _head_rounds_python(sorted_costs: list[float], end: int, m: int) -> tuple[list[int], list]:
    loads: list = [0] * m
    head: list[int] = []
    for start in range(0, end, m):
        ranked = sorted(range(m), key=loads.__getitem__)[: end - start]
        for target, value in zip(ranked, sorted_costs[start : start + m], strict=False):
            loads[target] += value
        head += ranked
    return head, loads


def _head_rounds_torch(sorted_costs: torch.Tensor, end: int, m: int) -> tuple[torch.Tensor, list]:
    """The same rounds as ``_head_rounds_python`` (same ties, same sums), with tensor ops."""
    loads = sorted_costs.new_zeros(m)
    rounds = []
    for start in range(0, end, m):
        ranked = torch.sort(loads, stable=True).indices[: end - start]
        loads.index_add_(0, ranked, sorted_costs[start : start + m])
        rounds.append(ranked)
    return torch.cat(rounds), loads.tolist()


def _by_load(loads: list) -> tuple[list[int], list]:
    """Bin ids by ascending load (ties: lower id), and their loads."""
    ranked = sorted(range(len(loads)), key=loads.__getitem__)
    return ranked, list(map(loads.__getitem__, ranked))


def _deal(plan: _Plan, m: int) -> _Dealt:
    """Deal the sorted costs into ``m`` microbatches (see the module docstring)."""
    sorted_costs = plan.sorted_costs
    b = len(sorted_costs)
    if plan.head_rounds is None:
        assert isinstance(sorted_costs, list)
        # A round is dealt one by one while its largest cost exceeds 1 / _HEAD_ROUNDS of the
        # mean microbatch load (the same test as _plan_on_device's).
        total, scale = sum(plan.natural), m * _HEAD_ROUNDS
        head_end = 0
        while head_end < min(b, scale) and sorted_costs[head_end] * scale > total:
            head_end += m
        head_end = min(head_end, b)
        head_costs = sorted_costs
    else:
        head_end = min(b, plan.head_rounds * m)
        head_costs = plan.head_costs
    head: list[int] | torch.Tensor
    if m > _PYTHON_ROUND_MAX and head_end:
        tensor = sorted_costs
        if not isinstance(tensor, torch.Tensor):
            tensor = _list_tensor(sorted_costs[:head_end], plan.integer)
        head, loads = _head_rounds_torch(tensor, head_end, m)
        last_round = head[(head_end - 1) // m * m :].tolist()
        ranked, ranked_loads = _by_load(loads)
    else:
        head, loads = _head_rounds_python(head_costs or [], head_end, m)
        ranked, ranked_loads = _by_load(loads)
        last_round = head[(head_end - 1) // m * m :] if head_end else []
    tail = b - head_end
    if tail:
        # The bins of the boustrophedon's last round (forward or backward: only the set counts).
        first_of_last = (tail - 1) // m * m
        n_last = tail - first_of_last
        last_round = ranked[m - n_last :] if (first_of_last // m) % 2 else ranked[:n_last]
        ranked_loads = list(map(add, ranked_loads, _column_sums(sorted_costs[head_end:], m)))
    fuller = set(last_round) if len(last_round) < m else set()
    return _Dealt(head, ranked, tail, fuller, max(ranked_loads))


def _column_sums(tail_costs: list[float] | torch.Tensor, m: int) -> list[float]:
    """Boustrophedon column sums: forward rounds add to column c, backward ones to m - 1 - c."""
    rounds = -(-len(tail_costs) // m)
    if isinstance(tail_costs, list):
        if rounds <= 2:
            sums = tail_costs[:m] + [0] * (m - min(m, len(tail_costs)))
            back = tail_costs[m:]
            if back:
                sums[m - len(back) :] = map(add, sums[m - len(back) :], reversed(back))
            return sums
        tail_costs = torch.frombuffer(array.array("d", tail_costs), dtype=torch.float64)
    columns = _boustrophedon(m, rounds * m)[: tail_costs.numel()]
    return tail_costs.new_zeros(m).index_add_(0, columns, tail_costs).tolist()


def _positions(dealt: _Dealt, m: int) -> list[int] | None:
    """Microbatch position of each bin: fuller bins first (``tensor_split``), then by id; None
    when no bin is fuller (every bin keeps its id)."""
    if not dealt.fuller:
        return None
    order = sorted(dealt.fuller)
    order += [bin_id for bin_id in range(m) if bin_id not in dealt.fuller]
    return sorted(range(m), key=order.__getitem__)  # the inverse permutation of ``order``


def _tail_bins(ranked: list[int], tail: int) -> list[int]:
    """Bins of boustrophedon positions 0..tail-1 over ``ranked``: forward, backward, ..."""
    there_and_back = ranked + ranked[::-1]
    return (there_and_back * -(-tail // len(there_and_back)))[:tail]


def _order_on_host(by_cost: list[int], dealt: _Dealt, m: int) -> torch.Tensor:
    b = len(by_cost)
    position = _positions(dealt, m)
    bins = dealt.head if isinstance(dealt.head, list) else dealt.head.tolist()
    if dealt.tail:
        bins = bins + _tail_bins(dealt.ranked, dealt.tail)
    microbatch = bins if position is None else map(position.__getitem__, bins)
    # One int per sample, microbatch * b + sample: sorted, they order by microbatch, then sample.
    keys = list(map(add, map(mul, microbatch, itertools.repeat(b)), by_cost))
    keys.sort()
    return _int64_tensor(keys) % b


@functools.lru_cache(maxsize=64)
def _boustrophedon(m: int, n: int) -> torch.Tensor:
    """Columns of boustrophedon positions 0..n-1 over m columns (cached: read-only)."""
    q = torch.arange(n)
    column = q % m
    return torch.where((q // m) % 2 == 1, m - 1 - column, column)


def _order_on_device(by_cost: torch.Tensor, dealt: _Dealt, m: int) -> torch.Tensor:
    """The same permutation as ``_order_on_host``, with tensor ops (on the CPU)."""
    b = by_cost.numel()
    position = _positions(dealt, m)
    tail = _tail_bins(dealt.ranked, dealt.tail)
    if isinstance(dealt.head, list):
        bins = dealt.head + tail
        microbatch = _int64_tensor(bins if position is None else [position[i] for i in bins])
    else:
        microbatch = dealt.head
        if position is not None:
            microbatch = _int64_tensor(position).index_select(0, microbatch)
            tail = [position[i] for i in tail]
        if tail:
            microbatch = torch.cat((microbatch, _int64_tensor(tail)))
    # Sorting (microbatch, sample) keys orders by microbatch, then by batch index.
    key = microbatch * b + _to(by_cost, torch.device("cpu"), torch.int64)
    return torch.sort(key).values % b


def _permutation(plan: _Plan, m: int) -> torch.Tensor | None:
    """The balanced order, or None when the batch order is at least as even."""
    b = len(plan.sorted_costs)
    if m == 1 or b == m:
        return None
    dealt = _deal(plan, m)
    # A relative slack keeps float costs summed in another order from forcing a useless copy.
    if max(plan.natural) <= dealt.max_load * (1 + 1e-9):
        return None
    if isinstance(plan.by_cost, list):
        return _order_on_host(plan.by_cost, dealt, m)
    return _order_on_device(plan.by_cost, dealt, m)


def _plan(
    batch: Mapping[str, Any], batch_size: int, n_microbatches: int, cost: SampleCost | None
) -> tuple[_Layout, _Plan | None]:
    layout = _plan_layout(batch, batch_size)
    if cost is None and not layout.cost_rows:
        return layout, None  # no media: nothing to balance, nothing to check
    user = None if cost is None else _user_cost(cost, batch, batch_size)
    entries = batch_size + sum(counted.values.shape[0] for counted in layout.counted)
    on_host = entries <= _HOST_PLAN_MAX
    plan = (_plan_on_host if on_host else _plan_on_device)(layout, user, n_microbatches)
    return layout, plan


def media_cost_per_sample(batch: Mapping[str, Any], batch_size: int) -> torch.Tensor:
    """Each sample's vision cost, the default of ``balance_microbatches``: int64 ``[B]``.

    The rows the sample owns in every pixel tensor of the batch: its patches in flat layouts
    (the sum of its items' grid products), its images (or crops) in per-image layouts, 1 for
    one image per sample; images and videos add up, text-only samples cost 0. The media are
    validated as ``prepare_vlm_media_for_pp`` validates them (one host read).
    """
    check_microbatches(batch_size, 1)
    _, plan = _plan(batch, batch_size, 1, None)
    if plan is None:
        return torch.zeros(batch_size, dtype=torch.int64)
    costs = torch.empty(batch_size, dtype=torch.int64)
    if isinstance(plan.by_cost, list):
        costs[_int64_tensor(plan.by_cost)] = _int64_tensor(plan.sorted_costs)
        return costs
    by_cost = _to(plan.by_cost, torch.device("cpu"), torch.int64)
    costs[by_cost] = torch.as_tensor(plan.sorted_costs, dtype=torch.int64)
    return costs


def _segment_index(lengths: torch.Tensor, order: torch.Tensor, total: int) -> torch.Tensor:
    """Row index that gathers each sample's rows (``lengths[i]`` of them) in ``order``."""
    starts = _zero_prefixed_ends(lengths)[:-1]
    new_lengths = lengths.index_select(0, order)
    shift = starts.index_select(0, order) - _zero_prefixed_ends(new_lengths)[:-1]
    return torch.repeat_interleave(shift, new_lengths, output_size=total) + torch.arange(
        total, device=lengths.device
    )


def _segment_lengths(layout: _Layout, rows: Rows, plan: _Plan) -> torch.Tensor:
    kind, index = rows
    if kind == "counted":
        return layout.counted[index].values
    patches = plan.patches[index]
    if isinstance(patches, torch.Tensor):
        return patches
    device = layout.counted[layout.flats[index].sizes].values.device
    return torch.tensor(patches, dtype=torch.int64, device=device)


def balance_microbatches(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    *,
    cost: SampleCost | None = None,
    keys: Collection[str] | None = None,
) -> torch.Tensor:
    """Permute the samples of ``batch`` so that every microbatch's vision cost is about even.

    Call it on a collated batch before ``prepare_vlm_media_for_pp``. The engine's rows per
    microbatch (``torch.tensor_split``) and the text shapes do not change; which samples fill
    them does. Every tensor with ``batch_size`` rows (input_ids, labels, attention_mask, ...;
    only those named in ``keys`` if given) is re-ordered, and the media follow their samples
    item by item: flat patches with their grid rows, per-image rows with
    ``n_images_per_sample``, one-per-sample layouts, Step3 crops, videos, per-item extras such
    as ``num_crops`` and ``second_per_grid_ts``. This copies the media once; the later split
    stays zero-copy. Non-tensor values are not touched (re-order them with the result).

    ``cost``: each sample's cost, a ``[B]`` tensor (or sequence) or a function of the batch
    returning one; default ``media_cost_per_sample`` (patches, or images in per-image layouts).
    Deterministic: ties break by batch index, so ranks that collate the same samples agree.

    Returns ``order`` (CPU int64 ``[B]``): row j now holds sample ``order[j]`` of the given batch
    (``restore_sample_order`` maps per-sample outputs back). When balancing would not lower the
    largest microbatch cost, the batch is left as it is and ``order`` is the identity. Input that
    ``prepare_vlm_media_for_pp`` rejects raises a ``ValueError`` naming the field here too, with
    the batch unchanged.
    """
    check_microbatches(batch_size, n_microbatches)
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch already carries '{VLM_PP_MEDIA_KEY}'; balance_microbatches "
            "re-orders the raw media, so call it before prepare_vlm_media_for_pp."
        )
    layout, plan = _plan(batch, batch_size, n_microbatches, cost)
    order = None if plan is None else _permutation(plan, n_microbatches)
    if order is None:
        return torch.arange(batch_size)

    updates: dict[str, torch.Tensor] = {}
    for rows, names in layout.segments:
        lengths = _segment_lengths(layout, rows, plan)
        total = int(batch[names[0]].shape[0])
        index = _segment_index(lengths, _to(order, lengths.device, torch.int64), total)
        for name in names:
            tensor = batch[name]
            updates[name] = tensor.index_select(0, _to(index, tensor.device, torch.int64))
    per_sample = list(layout.per_sample)
    skip = {VLM_PP_MEDIA_KEY, *_VLM_MEDIA_KEYS, *layout.consumed}
    for name, tensor in batch.items():
        if name in skip or not isinstance(tensor, torch.Tensor):
            continue
        if keys is not None and name not in keys:
            continue
        if tensor.dim() > 0 and tensor.shape[0] == batch_size:
            per_sample.append(name)
    for name in per_sample:
        tensor = batch[name]
        updates[name] = tensor.index_select(0, _to(order, tensor.device, torch.int64))
    batch.update(updates)
    return order


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
