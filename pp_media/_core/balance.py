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

import array
import functools
import itertools
from collections.abc import Collection, Mapping
from operator import add, mul
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
    if m > media_plan._PYTHON_ROUND_MAX and head_end:
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
