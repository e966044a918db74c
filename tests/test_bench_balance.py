"""The pure parts of ``benchmarks/bench_balance.py``: the schedule replay, the ideal bound and
the model of many random orders, checked against results known in closed form."""

from __future__ import annotations

import random

import pytest

from tests.helpers.benchmarks import loaded_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from loaded_benchmark("bench_balance")


def _uniform_times(bench, forward: float, backward: float):
    per_mb = [[forward, backward]] * bench.MICROBATCHES
    return {str(stage): per_mb for stage in range(bench.WORLD_SIZE)}


def _actions(bench):
    return {str(rank): bench.one_f_one_b_actions(rank) for rank in range(bench.WORLD_SIZE)}


def test_replay_of_even_1f1b_is_m_plus_s_minus_1_slots(bench) -> None:
    # 1F1B with equal stages takes (M + S - 1) * (f + b): M slots of work plus the bubble.
    times = _uniform_times(bench, 1.0, 2.0)
    expected = (bench.MICROBATCHES + bench.WORLD_SIZE - 1) * 3.0
    assert bench.replay(times, _actions(bench)) == pytest.approx(expected)
    assert bench.ideal_bound(times) == pytest.approx(bench.MICROBATCHES * 3.0)


def test_replay_waits_on_a_heavy_stage0_microbatch(bench) -> None:
    times = _uniform_times(bench, 1.0, 2.0)
    heavy = [list(t) for t in times["0"]]
    heavy[3] = [4.0, 8.0]  # four times the work on one microbatch of stage 0
    times["0"] = heavy
    even = (bench.MICROBATCHES + bench.WORLD_SIZE - 1) * 3.0
    # Stage 0 runs alone while stage 1 idles: the extra 9 units land on the step at least once.
    assert bench.replay(times, _actions(bench)) >= even + 9.0
    assert bench.ideal_bound(times) == pytest.approx((bench.MICROBATCHES * 6.0 + 9.0) / 2)


def test_extreme_patches_balance_to_one_heavy_sample_per_microbatch(bench) -> None:
    patches = bench.extreme_patches(random.Random(0))
    assert len(patches) == bench.BATCH
    assert sum(patches) == bench.BATCH * bench.MEAN_PATCHES
    per_mb = bench.balanced_patches(patches)
    assert per_mb == [bench.BATCH * bench.MEAN_PATCHES // bench.MICROBATCHES] * bench.MICROBATCHES
    assert sum(bench.microbatch_sums(patches)) == sum(patches)


@pytest.mark.parametrize("fixed_cost", [True, False])
def test_evened_model_keeps_the_ranks_even(bench, fixed_cost: bool) -> None:
    model = bench.CaseModel([(1.0, 0.01), (2.0, 0.02)], {"1": [3.0, 5.0], "2": [1.0, 1.0]})
    evened = model.evened(fixed_cost=fixed_cost)
    mean = bench.BATCH * bench.MEAN_PATCHES // bench.MICROBATCHES
    times = evened.times([mean] * bench.MICROBATCHES)
    rank0 = sum(sum(times[s][0]) for s in times if int(s) % bench.WORLD_SIZE == 0)
    rank1 = sum(sum(times[s][0]) for s in times if int(s) % bench.WORLD_SIZE == 1)
    fixed = (1.0, 2.0) if fixed_cost else (0.0, 0.0)
    assert times["0"][0] == pytest.approx([fixed[0] + 0.01 * mean, fixed[1] + 0.02 * mean])
    assert rank0 == pytest.approx(rank1)
