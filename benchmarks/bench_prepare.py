"""Benchmark: ``prepare_vlm_media_for_pp`` against the engine's own split of the text tensors.

Run from the repository root::

    python benchmarks/bench_prepare.py            # ~1 s of timing per case
    python benchmarks/bench_prepare.py --quick    # fewer repetitions, for a smoke run
    python benchmarks/bench_prepare.py --cpu-time # thread CPU time: a loaded machine

For each (B, M) it builds one Qwen2-VL-like batch (0-3 images per sample, flat ``pixel_values``
``[total_patches, 1176]``, ``image_grid_thw``, ``n_images_per_sample``; text tensors ``[B, 256]``)
and measures, interleaved (A, B, A, B, ...) to cancel drift:

* A: ``pp_media.prepare_vlm_media_for_pp(batch, B, M)`` on a fresh shallow copy of the batch,
* B: ``split_args_kwargs_into_chunks((), {input_ids, labels, attention_mask}, M)``,
* C: the fused ``balance_and_prepare_vlm_media_for_pp`` up to moving the data: one reading and
  host read of the batch, the default costs, the assignment, the permutation, the split offsets
  of the permuted batch and the split's views (not the copy that applies the permutation, timed
  once alone: ``index_select`` of the pixel rows),
* D: the floor of any planner of balancing's rule: the same reading and split views, plus only
  the steps the rule cannot do without, each in the cheapest form found (``floor_plan``),

and prints the medians and their ratios, then the ratios as the README's markdown table. The
design target (DESIGN.md, invariant 4) is that preparing the media costs about as much as the
engine's text split; this script checks ``ratio <= 0.6`` for the per-rank batch sizes people
train with (``B < 64``, where the fixed cost per call dominates) and ``ratio <= 0.5`` for
``B >= 64``. Balancing shares the split's reading, so what it adds to the split, ``(C - A) / A``,
should be at most 0.5; ``(D - A) / A`` is a floor on what a planner of the same rule adds
(its unavoidable steps, each in the cheapest form found), so a case whose floor exceeds 0.5
cannot meet that target with those steps. It reports only: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import array
import functools
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import add, itemgetter, mod, mul, sub
from pathlib import Path
from typing import Any

import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import pp_media  # noqa: E402
from pp_media._core.balanced import _plan_balanced_split  # noqa: E402
from pp_media._core.bounds import sample_bounds, sample_ends_tensor  # noqa: E402
from pp_media._core.media_plan import _HEAD_ROUNDS, _HOST_PLAN_MAX  # noqa: E402
from pp_media._core.row_maps import (  # noqa: E402
    flat_counted_sums,
    sample_row_counts,
    sizes_between,
    split_group,
)

CASES: tuple[tuple[int, int], ...] = ((8, 4), (16, 4), (64, 16), (512, 64), (2048, 256))
SEQ_LEN = 256
PATCH_DIM = 1176  # Qwen2-VL: 3 channels * 2 temporal * 14 * 14
SMALL_TARGET_RATIO = 0.6  # B < TARGET_MIN_B: the fixed per-call cost dominates
TARGET_RATIO = 0.5
TARGET_MIN_B = 64
SAMPLE_TARGET_S = 200e-6  # each timed sample runs enough calls to last at least this long
BALANCE_TARGET = 0.5  # what balancing's planning may add to the split, relative to it
#: The timer of every timed region: wall time, or this thread's CPU time (``--cpu-time``).
_clock = time.perf_counter


@dataclass(frozen=True)
class Batch:
    """One synthetic batch: media tensors, text kwargs for the engine, and its sizes."""

    media: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    n_images: int
    total_patches: int


@dataclass(frozen=True)
class Result:
    """Medians (seconds per call) of one case, and how they were sampled."""

    batch_size: int
    n_microbatches: int
    n_images: int
    total_patches: int
    prepare_s: float
    engine_s: float
    balance_s: float
    floor_s: float
    #: Medians over the interleaved samples of (C - A) / A and (D - A) / A: each sample's A, C
    #: and D ran back to back, so drift on a shared machine cancels in the pair.
    balance_ratio: float
    floor_ratio: float
    copy_s: float
    samples: int
    inner: int

    @property
    def ratio(self) -> float:
        """Prepare time over engine text-split time."""
        return self.prepare_s / self.engine_s


def make_batch(batch_size: int, seed: int) -> Batch:
    """A Qwen2-VL-like collated batch with 0-3 images per sample and grids [1, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (batch_size,), generator=gen, dtype=torch.int64)
    n_images = int(counts.sum())
    hw = 2 * torch.randint(2, 17, (n_images, 2), generator=gen, dtype=torch.int64)  # 4..32, even
    grid = torch.cat([torch.ones(n_images, 1, dtype=torch.int64), hw], dim=1)
    total_patches = int(grid.prod(dim=1).sum())
    media = {
        # Never read: torch.empty avoids touching (and paying for) gigabytes of pixels.
        "pixel_values": torch.empty(total_patches, PATCH_DIM, dtype=torch.float32),
        "image_grid_thw": grid,
        "n_images_per_sample": counts,
    }
    text = {
        "input_ids": torch.randint(0, 32000, (batch_size, SEQ_LEN), generator=gen),
        "labels": torch.randint(0, 32000, (batch_size, SEQ_LEN), generator=gen),
        "attention_mask": torch.ones(batch_size, SEQ_LEN, dtype=torch.int64),
    }
    return Batch(media, text, n_images, total_patches)


def fresh_dicts(batch: Batch, count: int) -> list[dict[str, Any]]:
    """``count`` shallow batch dicts over the same tensors (prepare pops the media)."""
    return [{**batch.text, **batch.media} for _ in range(count)]


def check_once(batch: Batch, batch_size: int, n_microbatches: int) -> None:
    """Sanity check outside timing (warns, never fails): M pixel chunks covering every patch."""
    out = pp_media.prepare_vlm_media_for_pp(fresh_dicts(batch, 1)[0], batch_size, n_microbatches)
    chunks = out[pp_media.VLM_PP_MEDIA_KEY]["pixel_values"]
    rows = sum(chunk.shape[0] for chunk in chunks)
    if len(chunks) != n_microbatches or rows != batch.total_patches:
        print(
            f"WARNING {batch_size}/{n_microbatches}: prepare gave {len(chunks)} pixel chunks "
            f"with {rows} rows; expected {n_microbatches} chunks with {batch.total_patches} rows"
        )


def time_prepare(batch: Batch, batch_size: int, n_microbatches: int, inner: int) -> float:
    """Seconds for ``inner`` prepare calls; the fresh dicts are built before the clock starts."""
    dicts = fresh_dicts(batch, inner)
    prepare = pp_media.prepare_vlm_media_for_pp
    start = _clock()
    for batch_dict in dicts:
        prepare(batch_dict, batch_size, n_microbatches)
    elapsed = _clock() - start
    del dicts  # frees the chunk views outside the timed region
    return elapsed


def time_balance(batch: Batch, batch_size: int, n_microbatches: int, inner: int) -> float:
    """Seconds for ``inner`` fused balance+split plans (C), views of the collated tensors kept
    until the clock stops."""
    dicts = fresh_dicts(batch, inner)
    kept: list[Any] = [None] * inner
    layout = pp_media.SEED_LAYOUT
    start = _clock()
    for i, batch_dict in enumerate(dicts):
        _, _, _, splits = _plan_balanced_split(batch_dict, batch_size, n_microbatches, None, layout)
        kept[i] = [split_group(r, items, rows, n_microbatches) for r, items, rows in splits]
    elapsed = _clock() - start
    del dicts, kept
    return elapsed


FloorPlan = tuple[torch.Tensor, list[list[torch.Tensor]]]


def floor_plan(batch_dict: dict[str, Any], batch_size: int, n_microbatches: int) -> FloorPlan:
    """D: the split's reading and views plus only what balancing's rule cannot do without.

    Any planner of the rule in ``pp_media._core.balance`` must read each sample's cost, sort
    the costs, rank the M microbatch loads once per round it deals one by one, sort the samples
    into their microbatches (batch order inside) and hand back that order as a tensor, and give
    the split the offsets of the permuted batch. This does exactly those steps, each in the
    cheapest form found: it skips resolving the layout (the fields are named), ranks loads that
    never change, and deals round-robin instead of by load. As far as these forms are the
    cheapest, no correct planner costs less: ``(D - A) / A`` is a floor on what planning adds to
    the split. Small batches
    take the planner's host path (Python lists), large ones its tensor path (the planner's
    threshold, ``_HOST_PLAN_MAX``). Returns the order and the pixel, grid and count views."""
    pixels = batch_dict["pixel_values"]
    grid = batch_dict["image_grid_thw"]
    counts = batch_dict["n_images_per_sample"]
    if batch_size + grid.shape[0] <= _HOST_PLAN_MAX:
        order, item_b, pixel_b = _floor_lists(pixels, grid, counts, batch_size, n_microbatches)
    else:
        order, item_b, pixel_b = _floor_tensors(pixels, grid, counts, batch_size, n_microbatches)
    return order, [
        list(pixels.split_with_sizes(sizes_between(pixel_b))),
        list(grid.split_with_sizes(sizes_between(item_b))),
        list(counts.split_with_sizes(sample_row_counts(batch_size, n_microbatches))),
    ]


def _head_rounds(sorted_heads: list[int], total: int, b: int, m: int) -> int:
    """Rounds the rule deals one by one, from each round's largest cost (``balance``'s test)."""
    rounds = 0
    while rounds < len(sorted_heads) and sorted_heads[rounds] * m * _HEAD_ROUNDS > total:
        rounds += 1
    return min(rounds, -(-b // m))


def _floor_lists(
    pixels: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor, b: int, m: int
) -> tuple[torch.Tensor, Any, Any]:
    sums = flat_counted_sums(pixels, grid, counts, b)
    assert sums is not None, "the benchmark's batch is valid"
    ends = itemgetter(*sums.item_sums)(sums.patch_sums)
    costs = list(map(sub, ends[1:], ends))
    by_cost = sorted(range(b), key=costs.__getitem__, reverse=True)
    heads = [costs[by_cost[start]] for start in range(0, min(b, m * _HEAD_ROUNDS), m)]
    loads = [0] * m
    for _ in range(_head_rounds(heads, ends[-1], b, m)):
        sorted(loads)
    keys = sorted(
        map(add, map(mul, map(mod, range(b), itertools.repeat(m)), itertools.repeat(b)), by_cost)
    )
    samples = list(map(mod, keys, itertools.repeat(b)))
    order = torch.frombuffer(array.array("q", samples), dtype=torch.int64)
    bounds = itemgetter(*sample_bounds(b, m))
    item_b = bounds(list(itertools.accumulate(map(sums.counts.__getitem__, samples), initial=0)))
    pixel_b = bounds(list(itertools.accumulate(map(costs.__getitem__, samples), initial=0)))
    return order, item_b, pixel_b


def _floor_tensors(
    pixels: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor, b: int, m: int
) -> tuple[torch.Tensor, Any, Any]:
    n_items = grid.shape[0]
    values = torch.cat((counts, grid.prod(dim=1)))
    sums = values.cumsum(0)
    offset = sums[b - 1 : b]
    costs = torch.diff(sums[b - 1 :].index_select(0, sums[:b].clamp(0, n_items)), prepend=offset)
    sorted_costs, by_cost = torch.sort(costs, descending=True, stable=True)
    heads = sorted_costs[::m][:_HEAD_ROUNDS]
    row = torch.cat((values.amin(0, keepdim=True), offset, sums[-1:], heads)).tolist()
    assert row[0] >= 0 and row[1] == n_items and row[2] - row[1] == pixels.shape[0]
    loads = costs.new_zeros(m)
    for _ in range(_head_rounds(row[3:], row[2] - row[1], b, m)):
        torch.sort(loads)
    key = _round_robin(b, m) * b + by_cost
    order = torch.sort(key).values % b
    ends = sample_ends_tensor(b, m, costs.device)
    offsets = torch.cat(
        (
            counts.index_select(0, order).cumsum(0).index_select(0, ends),
            costs.index_select(0, order).cumsum(0).index_select(0, ends),
        )
    ).tolist()
    return order, [0, *offsets[:m]], [0, *offsets[m:]]


@functools.lru_cache(maxsize=16)
def _round_robin(b: int, m: int) -> torch.Tensor:
    """Microbatch of each sorted position when dealt round-robin (cached: read-only)."""
    return torch.arange(b) % m


def time_floor(batch: Batch, batch_size: int, n_microbatches: int, inner: int) -> float:
    """Seconds for ``inner`` floor plans (D), results kept until the clock stops."""
    dicts = fresh_dicts(batch, inner)
    kept: list[Any] = [None] * inner
    start = _clock()
    for i, batch_dict in enumerate(dicts):
        kept[i] = floor_plan(batch_dict, batch_size, n_microbatches)
    elapsed = _clock() - start
    del dicts, kept
    return elapsed


def time_copy(batch: Batch, batch_size: int, n_microbatches: int) -> float:
    """Seconds for the copy that applies a balanced order to the pixel rows (once)."""
    planned = _plan_balanced_split(
        fresh_dicts(batch, 1)[0], batch_size, n_microbatches, None, pp_media.SEED_LAYOUT
    )
    pixels = batch.media["pixel_values"]
    index = torch.randperm(pixels.shape[0])
    if planned is None or planned[2] is None or pixels.numel() > 200_000_000:
        return float("nan")
    start = _clock()
    pixels.index_select(0, index)
    return _clock() - start


def time_engine(batch: Batch, n_microbatches: int, inner: int) -> float:
    """Seconds for ``inner`` engine splits of the text tensors (the engine does not mutate).

    Results are kept until the clock stops, as prepare's are (they live in its batch dicts),
    so neither side pays for freeing its views inside the timed region.
    """
    kwargs = dict(batch.text)
    kept: list[Any] = [None] * inner
    start = _clock()
    for i in range(inner):
        kept[i] = split_args_kwargs_into_chunks((), kwargs, n_microbatches)
    elapsed = _clock() - start
    del kept
    return elapsed


def per_call_estimate(fn: Callable[[int], float], budget_s: float = 0.02) -> float:
    """Rough seconds per call: warm up, then run single calls until ``budget_s`` is spent."""
    for _ in range(3):
        fn(1)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        times.append(fn(1))
    return statistics.median(times)


def run_case(batch_size: int, n_microbatches: int, case_s: float, min_samples: int) -> Result:
    """Time one (B, M) case interleaved, about ``case_s`` seconds in all."""
    batch = make_batch(batch_size, seed=batch_size * 1000 + n_microbatches)
    check_once(batch, batch_size, n_microbatches)

    def prep(n: int) -> float:
        return time_prepare(batch, batch_size, n_microbatches, n)

    def engine(n: int) -> float:
        return time_engine(batch, n_microbatches, n)

    def balance(n: int) -> float:
        return time_balance(batch, batch_size, n_microbatches, n)

    def floor(n: int) -> float:
        return time_floor(batch, batch_size, n_microbatches, n)

    est_prep, est_engine = per_call_estimate(prep), per_call_estimate(engine)
    est_balance, est_floor = per_call_estimate(balance), per_call_estimate(floor)
    inner = max(1, round(SAMPLE_TARGET_S / min(est_prep, est_engine)))
    per_sample = inner * (est_prep + est_engine + est_balance + est_floor)
    samples = max(min_samples, round(case_s / per_sample))

    prep_times: list[float] = []
    engine_times: list[float] = []
    balance_times: list[float] = []
    floor_times: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(samples):
            prep_times.append(prep(inner) / inner)
            engine_times.append(engine(inner) / inner)
            balance_times.append(balance(inner) / inner)
            floor_times.append(floor(inner) / inner)
    finally:
        gc.enable()
    return Result(
        batch_size,
        n_microbatches,
        batch.n_images,
        batch.total_patches,
        statistics.median(prep_times),
        statistics.median(engine_times),
        statistics.median(balance_times),
        statistics.median(floor_times),
        _paired_added(prep_times, balance_times),
        _paired_added(prep_times, floor_times),
        time_copy(batch, batch_size, n_microbatches),
        samples,
        inner,
    )


def _paired_added(base: list[float], other: list[float]) -> float:
    """Median over samples of ``(other - base) / base``."""
    return statistics.median((o - b) / b for b, o in zip(base, other, strict=True))


def print_report(results: list[Result]) -> None:
    """The table, then the target line with a verdict per case."""
    header = (
        f"{'B':>5} {'M':>4} {'n_images':>8} {'total_patches':>13} "
        f"{'prepare_us':>11} {'engine_us':>10} {'ratio':>7} {'balance_us':>11} "
        f"{'(C-A)/A':>8} {'floor_us':>9} {'(D-A)/A':>8} {'copy_us':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.batch_size:>5} {r.n_microbatches:>4} {r.n_images:>8} {r.total_patches:>13} "
            f"{r.prepare_s * 1e6:>11.1f} {r.engine_s * 1e6:>10.1f} {r.ratio:>7.2f} "
            f"{r.balance_s * 1e6:>11.1f} {r.balance_ratio:>8.2f} {r.floor_s * 1e6:>9.1f} "
            f"{r.floor_ratio:>8.2f} {r.copy_s * 1e6:>9.0f}"
        )
    print()
    verdicts = []
    for r in results:
        target = target_ratio(r.batch_size)
        ok = "meets" if r.ratio <= target else "MISSES"
        verdicts.append(f"{r.batch_size}/{r.n_microbatches}: {ok} ({r.ratio:.2f} <= {target})")
    print(
        f"target: ratio <= {SMALL_TARGET_RATIO} for B < {TARGET_MIN_B}, <= {TARGET_RATIO} "
        "from there -> " + "; ".join(verdicts)
    )
    balance_verdicts = [
        f"{r.batch_size}/{r.n_microbatches}: "
        f"{'meets' if r.balance_ratio <= BALANCE_TARGET else 'MISSES'} ({r.balance_ratio:.2f})"
        for r in results
    ]
    print(
        f"balancing's planning adds (C - A) / A <= {BALANCE_TARGET} of the split -> "
        + "; ".join(balance_verdicts)
    )
    beyond = f" > {BALANCE_TARGET}: out of reach"
    floors = [
        f"{r.batch_size}/{r.n_microbatches}: {r.floor_ratio:.2f}"
        + (beyond if r.floor_ratio > BALANCE_TARGET else "")
        for r in results
    ]
    print("floor of any planner of the same rule, (D - A) / A -> " + "; ".join(floors))
    sampling = ", ".join(
        f"{r.batch_size}/{r.n_microbatches}: {r.samples}x{r.inner}" for r in results
    )
    print(f"samples x calls per sample (medians over samples): {sampling}")
    print()
    print("| B / M | " + " | ".join(f"{r.batch_size} / {r.n_microbatches}" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    print("| prepare / engine text split | " + " | ".join(f"{r.ratio:.2f}" for r in results) + " |")
    print(
        "| balancing's planning added / split | "
        + " | ".join(f"{r.balance_ratio:.2f}" for r in results)
        + " |"
    )
    print(
        "| floor of any planner of the rule / split | "
        + " | ".join(f"{r.floor_ratio:.2f}" for r in results)
        + " |"
    )


def target_ratio(batch_size: int) -> float:
    """The ratio a case should reach: looser for small batches, where fixed costs dominate."""
    return SMALL_TARGET_RATIO if batch_size < TARGET_MIN_B else TARGET_RATIO


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every case, print the report; always returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~0.1 s per case instead of ~1 s")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time this thread's CPU time instead of wall time (a loaded machine)",
    )
    args = parser.parse_args(argv)
    global _clock
    _clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(1)
    case_s, min_samples = (0.1, 5) if args.quick else (1.0, 21)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, T={SEQ_LEN}, "
        f"D={PATCH_DIM}, ~{case_s:g} s per case{' (quick)' if args.quick else ''}, "
        f"{'thread CPU' if args.cpu_time else 'wall'} time"
    )
    results = [run_case(b, m, case_s, min_samples) for b, m in CASES]
    print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
