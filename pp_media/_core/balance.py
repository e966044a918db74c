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

The costs, and the one host read they take, come from ``media_plan``; this module holds only
the assignment and the permutation. Applying the permutation copies every re-ordered tensor
once (``index_select``) after sending the order (and the media's row index) to the media's
device.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection, Mapping
from operator import add, mod, mul
from typing import Any, NamedTuple

import torch

from pp_media._core import media_plan
from pp_media._core.media_plan import (
    _HEAD_ROUNDS,
    Rows,
    SampleLayout,
    _int64_tensor,
    _list_tensor,
    _Plan,
    _to,
    _zero_prefixed_ends,
)
from pp_media._keys import VLM_PP_MEDIA_KEY


class _Dealt(NamedTuple):
    """LPT by rounds over the sorted costs."""

    #: Bin id of each sorted position: host ints, or a CPU int64 tensor (tensor rounds).
    bins: list[int] | torch.Tensor
    #: Each bin's load, by bin id.
    loads: list
    #: Bins that take a sample in the last, partial round (they hold ``B // M + 1``), by id.
    fuller: list[int]


class _Order(NamedTuple):
    """A balanced order, and what the split after it needs."""

    #: Row j holds sample ``order[j]`` (CPU int64).
    order: torch.Tensor
    #: The same as host ints (small batches; None: read it from ``order``).
    samples: list[int] | None
    #: Each microbatch's cost in the new order.
    loads: list


def _head_end(plan: _Plan, m: int, b: int) -> int:
    """Sorted positions dealt one by one: whole rounds while a round's largest cost exceeds
    1 / _HEAD_ROUNDS of the mean microbatch load, at most ``_HEAD_ROUNDS`` of them."""
    if plan.head_rounds is not None:  # counted with tensor ops (the same test)
        return min(b, plan.head_rounds * m)
    sorted_costs = plan.sorted_costs
    total, scale = sum(plan.natural), m * _HEAD_ROUNDS
    stop, head_end = min(b, scale), 0
    while head_end < stop and sorted_costs[head_end] * scale > total:
        head_end += m
    return min(head_end, b)


def _head_rounds_python(costs: list, end: int, m: int) -> tuple[list[int], list]:
    """The bins of the first ``end`` sorted positions, round by round, and the loads. The
    first round finds every bin empty: its ties give bins 0, 1, ... in order."""
    if not end:
        return [], [0] * m
    first = min(m, end)
    loads = costs[:first] + [0] * (m - first)
    head = list(range(first))
    by_load = loads.__getitem__
    for start in range(m, end, m):
        ranked = sorted(range(m), key=by_load)[: end - start]
        for target, value in zip(ranked, costs[start : start + m], strict=False):
            loads[target] += value
        head += ranked
    return head, loads


def _head_rounds_torch(sorted_costs: torch.Tensor, end: int, m: int) -> tuple[torch.Tensor, list]:
    """The same rounds as ``_head_rounds_python`` (same ties, same sums), with tensor ops."""
    first = min(m, end)
    loads = sorted_costs.new_zeros(m)
    loads[:first] = sorted_costs[:first]
    rounds = [torch.arange(first)]
    for start in range(m, end, m):
        ranked = torch.sort(loads, stable=True).indices[: end - start]
        loads.index_add_(0, ranked, sorted_costs[start : start + m])
        rounds.append(ranked)
    return torch.cat(rounds) if len(rounds) > 1 else rounds[0], loads.tolist()


def _deal(plan: _Plan, m: int) -> _Dealt:
    """Deal the sorted costs into ``m`` bins (see the module docstring)."""
    sorted_costs = plan.sorted_costs
    b = len(sorted_costs)
    head_end = _head_end(plan, m, b)
    bins: list[int] | torch.Tensor
    if m > media_plan._PYTHON_ROUND_MAX and head_end:
        tensor = sorted_costs
        if not isinstance(tensor, torch.Tensor):
            tensor = _list_tensor(sorted_costs[:head_end], plan.integer)
        bins, loads = _head_rounds_torch(tensor, head_end, m)
    else:
        head_costs = sorted_costs if plan.head_costs is None else plan.head_costs
        bins, loads = _head_rounds_python(head_costs, head_end, m)
    n_last = b % m
    tail = b - head_end
    if tail:
        # The rest in one boustrophedon over the bins by load (ties: lower id).
        ranked = sorted(range(m), key=loads.__getitem__)
        tail_bins = _tail_bins(ranked, tail)
        if isinstance(sorted_costs, list):
            for target, value in zip(tail_bins, sorted_costs[head_end:], strict=True):
                loads[target] += value
        else:
            for target, value in zip(ranked, _column_sums(sorted_costs[head_end:], m), strict=True):
                loads[target] += value
        if isinstance(bins, list):
            bins += tail_bins
        else:
            bins = torch.cat((bins, _int64_tensor(tail_bins)))
        last = tail_bins[tail - n_last :] if n_last else []
    else:
        last = bins[b - n_last :] if n_last else []
        if isinstance(last, torch.Tensor):
            last = last.tolist()
    return _Dealt(bins, loads, sorted(last))


def _column_sums(tail_costs: torch.Tensor, m: int) -> list[float]:
    """Boustrophedon column sums: forward rounds add to column c, backward ones to m - 1 - c."""
    columns = _boustrophedon(m, -(-tail_costs.numel() // m) * m)[: tail_costs.numel()]
    return tail_costs.new_zeros(m).index_add_(0, columns, tail_costs).tolist()


def _tail_bins(ranked: list[int], tail: int) -> list[int]:
    """Bins of boustrophedon positions 0..tail-1 over ``ranked``: forward, backward, ..."""
    there_and_back = ranked + ranked[::-1]
    return (there_and_back * -(-tail // len(there_and_back)))[:tail]


@functools.lru_cache(maxsize=64)
def _boustrophedon(m: int, n: int) -> torch.Tensor:
    """Columns of boustrophedon positions 0..n-1 over m columns (cached: read-only)."""
    q = torch.arange(n)
    column = q % m
    return torch.where((q // m) % 2 == 1, m - 1 - column, column)


def _order(by_cost: list[int] | torch.Tensor, dealt: _Dealt, m: int) -> _Order:
    """Microbatch positions (fuller bins first, as ``tensor_split`` requires, then by id), each
    holding its samples in batch order."""
    b = len(by_cost)
    bins, loads = dealt.bins, dealt.loads
    position = None
    if dealt.fuller:
        fuller = set(dealt.fuller)
        by_position = dealt.fuller + [i for i in range(m) if i not in fuller]
        position = sorted(range(m), key=by_position.__getitem__)  # its inverse
        loads = list(map(loads.__getitem__, by_position))
    if isinstance(by_cost, list) and isinstance(bins, list):
        microbatch = bins if position is None else map(position.__getitem__, bins)
        # One int per sample, microbatch * b + sample: sorted, by microbatch, then sample.
        keys = sorted(map(add, map(mul, microbatch, itertools.repeat(b)), by_cost))
        samples = list(map(mod, keys, itertools.repeat(b)))
        return _Order(_int64_tensor(samples), samples, loads)
    microbatch = bins if isinstance(bins, torch.Tensor) else _int64_tensor(bins)
    if position is not None:
        microbatch = _int64_tensor(position).index_select(0, microbatch)
    by_cost_t = by_cost if isinstance(by_cost, torch.Tensor) else _int64_tensor(by_cost)
    key = microbatch * b + _to(by_cost_t, torch.device("cpu"), torch.int64)
    return _Order(torch.sort(key).values % b, None, loads)


def _balanced_order(plan: _Plan, m: int) -> _Order | None:
    """The balanced order, or None when the batch order is at least as even."""
    b = len(plan.sorted_costs)
    if m == 1 or b == m:
        return None
    dealt = _deal(plan, m)
    # A relative slack keeps float costs summed in another order from forcing a useless copy.
    if max(plan.natural) <= max(dealt.loads) * (1 + 1e-9):
        return None
    return _order(plan.by_cost, dealt, m)


def _permutation(plan: _Plan, m: int) -> torch.Tensor | None:
    """The balanced order as a tensor, or None when the batch order is at least as even."""
    order = _balanced_order(plan, m)
    return None if order is None else order.order


def _segment_index(lengths: torch.Tensor, order: torch.Tensor, total: int) -> torch.Tensor:
    """Row index that gathers each sample's rows (``lengths[i]`` of them) in ``order``."""
    starts = _zero_prefixed_ends(lengths)[:-1]
    new_lengths = lengths.index_select(0, order)
    shift = starts.index_select(0, order) - _zero_prefixed_ends(new_lengths)[:-1]
    return torch.repeat_interleave(shift, new_lengths, output_size=total) + torch.arange(
        total, device=lengths.device
    )


def _segment_lengths(layout: SampleLayout, rows: Rows, plan: _Plan) -> torch.Tensor:
    kind, index = rows
    if kind == "counted":
        return layout.counted[index].values
    patches = plan.patches[index]
    if isinstance(patches, torch.Tensor):
        return patches
    device = layout.counted[layout.flats[index].sizes].values.device
    return torch.tensor(patches, dtype=torch.int64, device=device)


def permuted_fields(
    batch: Mapping[str, Any],
    layout: SampleLayout,
    plan: _Plan,
    order: torch.Tensor,
    keys: Collection[str] | None,
) -> dict[str, torch.Tensor]:
    """Every re-ordered tensor of ``batch`` (the batch itself is not touched): the media by
    ``layout``, and every other tensor with B rows (only those in ``keys`` if given)."""
    batch_size = layout.batch_size
    updates: dict[str, torch.Tensor] = {}
    for rows, names in layout.segments:
        lengths = _segment_lengths(layout, rows, plan)
        total = int(batch[names[0]].shape[0])
        index = _segment_index(lengths, _to(order, lengths.device, torch.int64), total)
        for name in names:
            tensor = batch[name]
            updates[name] = tensor.index_select(0, _to(index, tensor.device, torch.int64))
    per_sample = list(layout.per_sample)
    skip = {VLM_PP_MEDIA_KEY, *layout.removed, *layout.consumed}
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
    return updates
