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

and prints the medians and their ratios, then the ratios as the README's markdown table. The
design target (DESIGN.md, invariant 4) is that preparing the media costs about as much as the
engine's text split; this script checks ``ratio <= 0.6`` for the per-rank batch sizes people
train with (``B < 64``, where the fixed cost per call dominates) and ``ratio <= 0.5`` for
``B >= 64``. Balancing shares the split's reading, so what it adds to the split, ``(C - A) / A``,
should be at most 0.5. It reports only: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import pp_media  # noqa: E402
from pp_media._core.balanced import _plan_balanced_split  # noqa: E402
from pp_media._core.row_maps import split_group  # noqa: E402

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
    copy_s: float
    samples: int
    inner: int

    @property
    def ratio(self) -> float:
        """Prepare time over engine text-split time."""
        return self.prepare_s / self.engine_s

    @property
    def balance_ratio(self) -> float:
        """What balancing's planning adds to the split, over the split."""
        return (self.balance_s - self.prepare_s) / self.prepare_s


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

    est_prep, est_engine = per_call_estimate(prep), per_call_estimate(engine)
    est_balance = per_call_estimate(balance)
    inner = max(1, round(SAMPLE_TARGET_S / min(est_prep, est_engine)))
    per_sample = inner * (est_prep + est_engine + est_balance)
    samples = max(min_samples, round(case_s / per_sample))

    prep_times: list[float] = []
    engine_times: list[float] = []
    balance_times: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(samples):
            prep_times.append(prep(inner) / inner)
            engine_times.append(engine(inner) / inner)
            balance_times.append(balance(inner) / inner)
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
        time_copy(batch, batch_size, n_microbatches),
        samples,
        inner,
    )


def print_report(results: list[Result]) -> None:
    """The table, then the target line with a verdict per case."""
    header = (
        f"{'B':>5} {'M':>4} {'n_images':>8} {'total_patches':>13} "
        f"{'prepare_us':>11} {'engine_us':>10} {'ratio':>7} {'balance_us':>11} "
        f"{'(C-A)/A':>8} {'copy_us':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.batch_size:>5} {r.n_microbatches:>4} {r.n_images:>8} {r.total_patches:>13} "
            f"{r.prepare_s * 1e6:>11.1f} {r.engine_s * 1e6:>10.1f} {r.ratio:>7.2f} "
            f"{r.balance_s * 1e6:>11.1f} {r.balance_ratio:>8.2f} {r.copy_s * 1e6:>9.0f}"
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
