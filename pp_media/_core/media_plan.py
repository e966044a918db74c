"""Per-sample media rows and costs: what balancing reads of a batch, once.

From the groups ``reading`` found (``read_media``: the one place that knows how items map to
samples and rows), ``sample_layout`` lists the 1-D integer tensors the host must see (item counts,
rows per item) with their checks, how every field follows its samples (per sample, or in
segments of a sample's items or rows), and which rows make a sample's default cost. ``plan``
then reads them once: small batches read the metadata and sum in Python, larger ones reduce
with tensor ops and read only the check values, the batch order's microbatch loads and the
costs of the rounds the assignment deals one by one (on an accelerator, the sorted costs, their
sample indices and the per-sample rows come back in the same copy). The plan holds each group's
per-sample items and rows on the host, so the split after a permutation needs no second read.
"""

from __future__ import annotations

import array
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import add, sub
from typing import Any, NamedTuple

import torch

from pp_media._core.bounds import sample_bounds, sample_ends_tensor
from pp_media._core.errors import check_microbatches, media_error
from pp_media._core.reading import GroupReading, present_media, read_media
from pp_media._core.row_maps import flat_counted_fits, flat_counted_sums
from pp_media._layouts import SEED_LAYOUT, MediaGroup, MediaLayout

#: A per-sample cost: a ``[B]`` tensor (or sequence), or a function of the batch returning one.
SampleCost = torch.Tensor | Callable[[Mapping[str, Any]], Any]

#: Rounds dealt one by one at most (the rest in one boustrophedon; see ``balance``).
_HEAD_ROUNDS = 16
#: Batches with at most this many samples plus metadata entries plan in Python.
_HOST_PLAN_MAX = 512
#: Up to this many microbatches a round is dealt in Python, above it with tensor ops.
_PYTHON_ROUND_MAX = 128

#: Raises on a (sum, minimum) that the core would reject.
Check = Callable[[int, int], None]


class _Counted(NamedTuple):
    """A 1-D int64 tensor (counts, grid sizes) whose sum and minimum ``check`` validates."""

    values: torch.Tensor
    check: Check


class _Flat(NamedTuple):
    """Flat pixels: item i has ``counted[sizes].values[i]`` rows; sample s owns
    ``counted[counts].values[s]`` consecutive items (one each when ``counts`` is None)."""

    sizes: int
    counts: int | None


#: Per-sample rows: "ones", ("counted", i): the values of ``counted[i]``, or ("flat", i): the
#: rows of ``flats[i]``.
Rows = str | tuple[str, int]


class _Group(NamedTuple):
    """A group's reading and where its per-sample items and flat rows are in the layout."""

    reading: GroupReading
    counts: int | None
    flat: int | None


@dataclass
class SampleLayout:
    """How the media of a batch hang off its samples, and what must hold before moving them."""

    batch_size: int
    removed: tuple[str, ...] = ()
    groups: list[_Group] = field(default_factory=list)
    counted: list[_Counted] = field(default_factory=list)
    flats: list[_Flat] = field(default_factory=list)
    #: Media fields with one row per sample: ``index_select(order)``.
    per_sample: list[str] = field(default_factory=list)
    #: (rows per sample, fields whose rows follow the samples in batch order).
    segments: list[tuple[Rows, list[str]]] = field(default_factory=list)
    #: Rows of each sample in each pixel tensor: their sum is the default cost.
    cost_rows: list[Rows] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    #: Groups planned on a short path whose moves are not listed yet (``complete``).
    pending: list[GroupReading] = field(default_factory=list)

    def complete(self) -> SampleLayout:
        """List the moves of the pending groups (a permutation is about to apply); returns self."""
        pending, self.pending = self.pending, []
        for reading in pending:
            add_group(self, reading)
        return self

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


def add_group(layout: SampleLayout, reading: GroupReading) -> None:
    """Where the fields of one group go when its samples move, and what they cost."""
    group = reading.group
    # The pixels and the fields that follow their rows move together.
    pixel_fields = [group.pixels, *(name for name, _ in reading.per_row_fields)]
    item_fields = list(pixel_fields) if reading.pixel_rows == "items" else []
    item_fields += [reading.row_field] if reading.row_field is not None else []
    item_fields += [name for name, _ in reading.item_fields]
    layout.consumed.update(reading.names)
    layout.per_sample += [name for name, _ in reading.sample_fields]
    if reading.pixel_rows == "samples":
        layout.per_sample += pixel_fields
    counts_index = None
    if reading.counts is None:
        layout.per_sample += item_fields  # one item per sample
        item_rows: Rows = "ones"
    else:
        device = reading.sizes.device if reading.sizes is not None else reading.counts.device
        counts = _to(reading.counts, device, torch.int64)
        counts_index = layout.count(counts, reading.check_counts)
        if reading.counts_given:
            layout.per_sample.append(reading.counts_name)
        item_rows = ("counted", counts_index)
        if item_fields:
            layout.segments.append((item_rows, item_fields))
    flat_index = None
    if reading.pixel_rows == "rows":
        sizes_index = layout.count(reading.sizes, reading.check_sizes)
        layout.flats.append(_Flat(sizes_index, counts_index))
        flat_index = len(layout.flats) - 1
        layout.segments.append((("flat", flat_index), pixel_fields))
        layout.cost_rows.append(("flat", flat_index))
    else:
        layout.cost_rows.append("ones" if reading.pixel_rows == "samples" else item_rows)
    given = {name for name, _ in reading.item_fields}
    layout.cost_rows += [item_rows for name in group.item_pixels if name in given]
    layout.groups.append(_Group(reading, counts_index, flat_index))


def sample_layout(
    batch: Mapping[str, Any], batch_size: int, media_layout: MediaLayout = SEED_LAYOUT
) -> SampleLayout:
    """Check shapes the way ``prepare_vlm_media_for_pp`` does; values are checked after the read."""
    present = present_media(batch, media_layout)
    if not present:
        return SampleLayout(batch_size)
    reading = read_media(present, batch_size, media_layout)
    layout = SampleLayout(batch_size, reading.removed)
    for group in reading.groups:
        add_group(layout, group)
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
    #: Per group of ``SampleLayout.groups``: each sample's items (None: one each) and flat
    #: rows (None: not flat), host lists or CPU tensors, for the split after a permutation.
    group_rows: list[tuple[Any, Any]]
    #: The group whose flat rows are the costs (a microbatch's rows are then its load).
    cost_group: int | None = None


def _int64_tensor(values: list[int]) -> torch.Tensor:
    """``torch.tensor(values)`` for ints, read from a buffer: several times faster. The tensor
    shares the buffer and cannot be resized: hand out only tensors computed from it."""
    if not values:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def _list_tensor(values: list, integer: bool) -> torch.Tensor:
    """``torch.tensor(values)`` of a non-empty list of ints (int64) or floats (float64: the
    host's own sums)."""
    if integer:
        return _int64_tensor(values)
    return torch.frombuffer(array.array("d", values), dtype=torch.float64)


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
    layout: SampleLayout, rows: Rows, entries: list[torch.Tensor], patches: list[torch.Tensor]
) -> torch.Tensor:
    if rows == "ones":
        return torch.ones(layout.batch_size, dtype=torch.int64)
    kind, index = rows
    return entries[index] if kind == "counted" else patches[index]


def _plan_on_device(layout: SampleLayout, user: torch.Tensor | None, m: int) -> _Plan:
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
    group_rows = [
        (
            None if g.counts is None else entries[g.counts],
            None if g.flat is None else patches[g.flat],
        )
        for g in layout.groups
    ]
    if _is_host(device) and all(_is_host(t.device) for t in entries):
        sorted_cpu = _to(sorted_costs, device, dtype)
    else:
        # The sorted costs, their sample indices and every group's per-sample rows travel in
        # the same copy: one sync, not several.
        rows = [t for pair in group_rows for t in pair if t is not None]
        tail = [sorted_costs, by_cost, *rows]
        packed = torch.cat((packed, *(_to(t, device, dtype) for t in tail))).cpu()
        sorted_cpu = packed[n_values : n_values + b]
        by_cost = packed[n_values + b : n_values + 2 * b].to(torch.int64)
        host = iter(packed[n_values + 2 * b :].to(torch.int64).split(b))
        group_rows = [tuple(None if t is None else next(host) for t in pair) for pair in group_rows]
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
    return _Plan(
        by_cost, sorted_cpu, int(head_rounds), head_costs, natural, patches, integer, group_rows
    )


def _plan_on_host(layout: SampleLayout, user: torch.Tensor | None, m: int) -> _Plan:
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
    group_rows = [
        (None if g.counts is None else lists[g.counts], None if g.flat is None else patches[g.flat])
        for g in layout.groups
    ]
    return _Plan(by_cost, sorted_costs, None, None, natural, patches, integer, group_rows)


def plan_flat_counted(
    group: MediaGroup, fields: tuple[str, str, str], present: Mapping[str, Any], b: int, m: int
) -> tuple[GroupReading, _Plan] | None:
    """The common layout (flat pixels, a 2-D grid, per-sample counts) on a short path: the
    split's own read (``row_maps.flat_counted_sums`` for small batches, its one prefix sum over
    counts and patch sizes for larger ones on the CPU), with the checks of ``read_media``, then
    the default costs.

    Returns the group's reading and the plan only for input the general path accepts too, with
    the same plan; None for anything else (another type, dtype, shape, size or device, a bad
    value), which the general path then plans or rejects with the message naming the field.
    """
    pixels, grid, counts = (present[name] for name in fields)
    if not flat_counted_fits(pixels, grid, counts, b):
        return None
    if b + grid.shape[0] > _HOST_PLAN_MAX:
        plan = _plan_flat_counted_tensors(pixels, grid, counts, b, m)
    else:
        plan = _plan_flat_counted_lists(pixels, grid, counts, b, m)
    if plan is None:
        return None
    reading = GroupReading(
        group,
        b,
        pixels,
        "rows",
        counts,
        True,
        fields[1],
        grid,
        plan[1],
        fields[1],
        grid.shape[0],
        [],
        [],
    )
    return reading, plan[0]


def _plan_flat_counted_lists(
    pixels: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor, b: int, m: int
) -> tuple[_Plan, torch.Tensor] | None:
    """Small batches: the split's host read, then everything in Python."""
    sums = flat_counted_sums(pixels, grid, counts, b)
    if sums is None:
        return None
    ends = list(map(sums.patch_sums.__getitem__, sums.item_sums))
    patches = list(map(sub, ends[1:], ends))
    bounds = sample_bounds(b, m)
    natural = list(map(sub, map(ends.__getitem__, bounds[1:]), map(ends.__getitem__, bounds)))
    by_cost = sorted(range(b), key=patches.__getitem__, reverse=True)
    sorted_costs = list(map(patches.__getitem__, by_cost))
    group_rows = [(sums.counts, patches)]
    plan = _Plan(by_cost, sorted_costs, None, None, natural, [patches], True, group_rows, 0)
    return plan, sums.sizes


def _plan_flat_counted_tensors(
    pixels: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor, b: int, m: int
) -> tuple[_Plan, torch.Tensor] | None:
    """Larger batches on the CPU: the split's prefix sum over the counts and patch sizes also
    gives each sample's patches; one read of the checks, the batch order's loads and the costs
    of the rounds dealt one by one (as ``_plan_on_device`` plans them)."""
    if not (_is_host(grid.device) and _is_host(counts.device)):
        return None
    n_items = grid.shape[0]
    sizes = grid.prod(dim=1)
    values = torch.cat((counts, sizes))
    sums = values.cumsum(0)
    # sums[b - 1 + e]: every count plus the patches of the first e items.
    offset = sums[b - 1 : b]
    ends = sums[b - 1 :].index_select(0, sums[:b].clamp(0, n_items))
    patches = torch.diff(ends, prepend=offset)
    sorted_costs, by_cost = torch.sort(patches, descending=True, stable=True)
    natural_ends = ends.index_select(0, sample_ends_tensor(b, m, ends.device))
    python_rounds = m <= _PYTHON_ROUND_MAX
    heads = sorted_costs[: _HEAD_ROUNDS * m] if python_rounds else sorted_costs[::m][:_HEAD_ROUNDS]
    row = torch.cat((values.amin(0, keepdim=True), offset, sums[-1:], natural_ends, heads))
    row = row.tolist()
    minimum, n_counted, total = row[0], row[1], row[2] - row[1]
    if minimum < 0 or n_counted != n_items or total != pixels.shape[0]:
        return None
    ends_list = row[3 : 3 + m]
    natural = list(map(sub, ends_list, [n_counted, *ends_list[:-1]]))
    head_values = row[3 + m :]
    leading = head_values[::m] if python_rounds else head_values
    scale, head_rounds = m * _HEAD_ROUNDS, 0
    while head_rounds < len(leading) and leading[head_rounds] * scale > total:
        head_rounds += 1
    head_costs = head_values[: min(b, head_rounds * m)] if python_rounds else None
    counts64 = _to(counts, counts.device, torch.int64)
    plan = _Plan(
        by_cost,
        sorted_costs,
        head_rounds,
        head_costs,
        natural,
        [patches],
        True,
        [(counts64, patches)],
        0,
    )
    return plan, sizes


def _plan(
    batch: Mapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    cost: SampleCost | None,
    media_layout: MediaLayout = SEED_LAYOUT,
) -> tuple[SampleLayout, _Plan | None]:
    """The batch read once: its sample layout, and the plan (None: no media and no cost)."""
    layout = sample_layout(batch, batch_size, media_layout)
    if cost is None and not layout.cost_rows:
        return layout, None  # no media: nothing to balance, nothing to check
    user = None if cost is None else _user_cost(cost, batch, batch_size)
    entries = batch_size + sum(counted.values.shape[0] for counted in layout.counted)
    on_host = entries <= _HOST_PLAN_MAX
    plan = (_plan_on_host if on_host else _plan_on_device)(layout, user, n_microbatches)
    return layout, plan


def media_cost_per_sample(
    batch: Mapping[str, Any], batch_size: int, *, layout: MediaLayout = SEED_LAYOUT
) -> torch.Tensor:
    """Each sample's vision cost, the default of ``balance_microbatches``: int64 ``[B]``.

    The rows the sample owns in every pixel tensor of the batch: its patches in flat layouts
    (the sum of its items' grid products), its images (or crops) in per-image layouts, 1 for
    one image per sample; images and videos add up, text-only samples cost 0. The media are
    validated as ``prepare_vlm_media_for_pp`` validates them (one host read).
    """
    check_microbatches(batch_size, 1)
    _, plan = _plan(batch, batch_size, 1, None, layout)
    if plan is None:
        return torch.zeros(batch_size, dtype=torch.int64)
    costs = torch.empty(batch_size, dtype=torch.int64)
    if isinstance(plan.by_cost, list):
        costs[_int64_tensor(plan.by_cost)] = _int64_tensor(plan.sorted_costs)
        return costs
    by_cost = _to(plan.by_cost, torch.device("cpu"), torch.int64)
    costs[by_cost] = torch.as_tensor(plan.sorted_costs, dtype=torch.int64)
    return costs
