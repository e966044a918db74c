"""Media-balanced microbatches: a permutation of the samples, and nothing else changes.

Every sample's media still go with that sample's text after balancing and preparing (every
layout, hypothesis: the media values and input_ids[:, 0] name their owner sample), the order
maps back, bad input is refused like the core refuses it, and on two real gloo ranks a balanced
step's loss and gradients equal the collated order's (``balance_worker.py``).
"""

from __future__ import annotations

import contextlib
import pickle
import random
import warnings
from typing import Any
from unittest import mock

import balance_worker
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pp_media
from pp_media import (
    VLM_PP_MEDIA_KEY,
    VLM_PP_SAMPLE_ORDER_KEY,
    balance_microbatches,
    media_cost_per_sample,
    prepare_vlm_media_for_pp,
    restore_sample_order,
)
from pp_media._core import balance as balance_module
from pp_media._core import balanced as balanced_module
from pp_media._core import media_plan
from pp_media._core import reading as reading_module
from pp_media._core.bounds import sample_bounds
from pp_media._core.row_maps import split_group
from tests.helpers import media_batches as mb
from tests.helpers.ranks import case_results, spawn_ranks
from tests.helpers.strategies import BatchSpec, batch_specs, build_batch, example_spec

TEXT = ("input_ids", "attention_mask", "labels")


def _loads(costs: torch.Tensor, n_microbatches: int) -> list[float]:
    bounds = sample_bounds(costs.numel(), n_microbatches)
    return [float(costs[bounds[k] : bounds[k + 1]].sum()) for k in range(n_microbatches)]


def _assert_media_follow(
    batch: dict[str, Any], media: mb.MediaBatch, m: int, exact: bool = True
) -> None:
    """Chunk k of every media field holds exactly the rows of the samples now in microbatch k."""
    chunks = batch[VLM_PP_MEDIA_KEY]
    assert set(chunks) == set(media.per_sample) if exact else set(media.per_sample) <= set(chunks)
    samples = mb.engine_sample_chunks(batch["input_ids"], m)
    for name in media.per_sample:
        for k, ids in enumerate(samples):
            want = media.expected(name, ids)
            got = chunks[name][k]
            assert got.shape == want.shape, f"{name}[{k}] (samples {ids})"
            assert torch.equal(got, want), f"{name}[{k}] (samples {ids}): values differ"


#: (_HOST_PLAN_MAX, _PYTHON_ROUND_MAX): host plan and Python rounds, tensor plan and tensor
#: rounds, and the two mixed; every batch of the hypothesis tests takes one of them.
PATHS = ((10**9, 10**9), (0, 0), (10**9, 0), (0, 10**9))


def _on_path(path: tuple[int, int]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(media_plan, "_HOST_PLAN_MAX", path[0]))
    stack.enter_context(mock.patch.object(media_plan, "_PYTHON_ROUND_MAX", path[1]))
    return stack


@given(batch_specs(), st.data())
def test_balanced_samples_keep_their_media_in_every_layout(spec: BatchSpec, data: Any) -> None:
    """Every layout, with or without videos, default or random costs, small-batch and
    large-batch code paths: after balancing then preparing, microbatch k's media are those of
    the samples the engine now gives it."""
    with _on_path(data.draw(st.sampled_from(PATHS))):
        _check_balanced_batch(spec, data)


def _check_balanced_batch(spec: BatchSpec, data: Any) -> None:
    media = build_batch(spec)
    batch = media.batch
    b, m = spec.batch_size, spec.n_microbatches
    before = {name: batch[name].clone() for name in TEXT}
    default_cost = media_cost_per_sample(batch, b)
    cost = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=b, max_size=b)))
    costs = default_cost if cost is None else torch.tensor(cost)

    order = balance_microbatches(batch, b, m, cost=cost)

    assert order.dtype == torch.int64
    assert sorted(order.tolist()) == list(range(b))
    for name in TEXT:
        assert torch.equal(batch[name], before[name][order]), name
    assert batch["input_ids"][:, 0].tolist() == order.tolist()
    assert torch.equal(media_cost_per_sample(batch, b), default_cost[order])
    assert max(_loads(costs[order], m)) <= max(_loads(costs, m))
    prepare_vlm_media_for_pp(batch, b, m)
    _assert_media_follow(batch, media, m)
    assert torch.equal(restore_sample_order(batch["input_ids"], order), before["input_ids"])


@given(batch_specs(), st.data())
def test_fused_balance_and_split_equals_the_two_in_turn(spec: BatchSpec, data: Any) -> None:
    """One reading for both: the same order and the same chunks as balance_microbatches then
    prepare_vlm_media_for_pp, in every layout and on every planning path."""
    b, m = spec.batch_size, spec.n_microbatches
    cost = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=b, max_size=b)))
    fused, apart = build_batch(spec).batch, build_batch(spec).batch
    with _on_path(data.draw(st.sampled_from(PATHS))):
        order = pp_media.balance_and_prepare_vlm_media_for_pp(fused, b, m, cost=cost)
        assert order.tolist() == balance_microbatches(apart, b, m, cost=cost).tolist()
    prepare_vlm_media_for_pp(apart, b, m)
    assert fused.keys() == apart.keys()
    for name, value in apart.items():
        if name != VLM_PP_MEDIA_KEY:
            assert torch.equal(fused[name], value), name
    for name, chunks in apart[VLM_PP_MEDIA_KEY].items():
        got = fused[VLM_PP_MEDIA_KEY][name]
        assert [c.shape for c in got] == [c.shape for c in chunks], name
        assert all(torch.equal(x, y) for x, y in zip(got, chunks, strict=True)), name


def _same(got: Any, want: Any) -> bool:
    """Equal values of the same kinds: tensors (and dtypes), lists, tuples, numbers."""
    if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and isinstance(want, torch.Tensor)
            and (got.dtype == want.dtype and torch.equal(got, want))
        )
    if isinstance(got, list | tuple):
        return type(got) is type(want) and len(got) == len(want) and all(map(_same, got, want))
    return got == want


@given(
    batch_specs(layouts=("qwen", "kimi"), videos=False),
    st.integers(1, 12),
    st.sampled_from(PATHS),
)
def test_the_common_layout_plans_on_a_short_path_as_the_general_one(
    spec: BatchSpec, m: int, path: tuple[int, int]
) -> None:
    """Flat images, a grid, counts: the short path's plan (host lists or tensors) is the
    general path's."""
    batch = build_batch(spec).batch
    b = spec.batch_size
    m = min(m, b)
    layout = pp_media.SEED_LAYOUT
    present = reading_module.present_media(batch, layout)
    fields = reading_module.flat_counted_fields(layout, frozenset(present))
    with _on_path(path):
        short = media_plan.plan_flat_counted(layout.groups[0], fields, present, b, m)
        if short is None:  # one row per image: read as per-image rows, the general path's case
            assert batch["pixel_values"].shape[0] == batch[fields[1]].shape[0]
            return
        _, general = media_plan._plan(batch, b, m, None)
    for name in general._fields:
        if name != "cost_group":
            assert _same(getattr(short[1], name), getattr(general, name)), name


def _reference_lpt(costs: list[float], m: int) -> float:
    """Largest microbatch cost of LPT by rounds with every round dealt one by one."""
    loads = [0.0] * m
    ordered = sorted(costs, reverse=True)
    for start in range(0, len(ordered), m):
        for target, value in zip(
            sorted(range(m), key=loads.__getitem__), ordered[start : start + m], strict=False
        ):
            loads[target] += value
    return max(loads)


def _random_costs(rng: random.Random, kind: str, b: int) -> list[int]:
    if kind == "long_tail":  # 10% of the samples hold 70% of the patches
        heavy = max(1, b // 10)
        return [int(7000 / heavy * rng.uniform(0.8, 1.2)) for _ in range(heavy)] + [
            int(3000 / (b - heavy) * rng.uniform(0.5, 1.5)) for _ in range(b - heavy)
        ]
    if kind == "mixed":  # half text-only
        return [0 if rng.random() < 0.5 else rng.randint(50, 2000) for _ in range(b)]
    return [rng.randint(500, 1500) for _ in range(b)]


@pytest.mark.parametrize("kind", ["uniform", "long_tail", "mixed"])
def test_assignment_is_close_to_full_lpt_and_the_same_on_every_path(kind: str) -> None:
    """Within 5% of dealing every round one by one; the Python and tensor paths agree."""
    rng = random.Random(kind)
    for b, m in ((8, 4), (40, 4), (64, 16), (160, 16), (300, 64), (600, 8)):
        costs = _random_costs(rng, kind, b)
        rng.shuffle(costs)
        orders = []
        for path in PATHS:
            with _on_path(path):
                batch = {"input_ids": torch.arange(b)}
                orders.append(balance_microbatches(batch, b, m, cost=costs).tolist())
        assert all(order == orders[0] for order in orders[1:]), (b, m)
        balanced = max(_loads(torch.tensor(costs)[orders[0]], m))
        assert balanced <= max(1.05 * _reference_lpt(costs, m), max(_loads(torch.tensor(costs), m)))


def _reference_order(costs: list[float], m: int) -> list[int]:
    """The documented rule (``balance``'s docstring), written out plainly: rounds dealt one by
    one while a round's largest cost exceeds 1/16 of the mean microbatch load (16 at most),
    the rest back and forth over the bins by load; fuller bins first; batch order inside."""
    b = len(costs)
    if m == 1 or b == m:
        return list(range(b))
    by_cost = sorted(range(b), key=lambda i: (-costs[i], i))
    loads, bin_of, start = [0] * m, {}, 0

    def by_load() -> list[int]:
        return sorted(range(m), key=lambda j: (loads[j], j))

    while start < b and start < 16 * m and costs[by_cost[start]] * 16 * m > sum(costs):
        for target, i in zip(by_load(), by_cost[start : start + m], strict=False):
            bin_of[i], loads[target] = target, loads[target] + costs[i]
        start += m
    ranked = by_load()
    for k, i in enumerate(by_cost[start:]):
        lap, column = divmod(k, m)
        target = ranked[column] if lap % 2 == 0 else ranked[m - 1 - column]
        bin_of[i], loads[target] = target, loads[target] + costs[i]
    if max(_loads(torch.tensor(costs, dtype=torch.float64), m)) <= max(loads) * (1 + 1e-9):
        return list(range(b))
    fuller = sorted({bin_of[i] for i in by_cost[b - b % m :]}) if b % m else []
    by_position = fuller + [j for j in range(m) if j not in fuller]
    return sorted(range(b), key=lambda i: (by_position.index(bin_of[i]), i))


@given(
    st.integers(1, 160).flatmap(
        lambda b: st.tuples(
            st.one_of(
                st.lists(st.integers(0, 3), min_size=b, max_size=b),  # many ties
                st.lists(st.integers(0, 10**6), min_size=b, max_size=b),
                st.lists(st.integers(0, 4000).map(lambda q: q / 4), min_size=b, max_size=b),
            ),
            st.integers(1, b),
        )
    ),
    st.sampled_from(PATHS),
)
def test_the_deal_is_the_documented_rule(costs_m: tuple[list[float], int], path: Any) -> None:
    """Every planning path deals random costs (ties, wide ranges, exact floats) exactly as
    the plain reference does."""
    costs, m = costs_m
    b = len(costs)
    with _on_path(path):
        order = balance_microbatches({"input_ids": torch.arange(b)}, b, m, cost=costs)
    assert order.tolist() == _reference_order(costs, m)


def test_long_tail_puts_one_heavy_sample_in_each_microbatch() -> None:
    """40 samples, 4 heavy ones clustered in the first microbatch: one heavy per microbatch."""
    costs = [1000, 900, 950, 1100] + [10 + i % 7 for i in range(36)]
    batch = {"input_ids": torch.arange(40).view(40, 1)}
    order = balance_microbatches(batch, 40, 4, cost=costs)
    for k, chunk in enumerate(torch.tensor_split(order, 4)):
        assert sum(int(i) < 4 for i in chunk) == 1, (k, chunk.tolist())


def test_per_item_extras_follow_their_items() -> None:
    """num_crops (per image), second_per_grid_ts (per video): moved with their grid rows."""
    media = build_batch(example_spec("qwen", videos=True))  # images (0, 1, 2, 0, 1)
    batch = media.batch
    batch["num_crops"] = torch.tensor([10, 20, 21, 40])  # sample * 10 + image
    batch["second_per_grid_ts"] = torch.tensor([0.5, 3.5])  # videos of samples 0 and 3
    order = balance_microbatches(batch, 5, 2, cost=[0, 0, 0, 9, 9])
    assert order.tolist() != list(range(5))
    owners = [i for i in order.tolist() for _ in range([0, 1, 2, 0, 1][i])]
    assert (batch["num_crops"] // 10).tolist() == owners
    video_owners = [i for i in order.tolist() if i in (0, 3)]
    assert batch["second_per_grid_ts"].tolist() == [0.5 + i for i in video_owners]
    prepare_vlm_media_for_pp(batch, 5, 2)
    _assert_media_follow(batch, media, 2, exact=False)  # pixels, grids, counts: owner-exact


def test_one_row_per_sample_with_a_per_row_mask() -> None:
    """Idefics3-style: pixel_values [B, crops, ...] and pixel_attention_mask [B, ...]."""
    pixels = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3).clone()
    batch = {
        "input_ids": torch.arange(4).view(4, 1),
        "pixel_values": pixels,
        "pixel_attention_mask": pixels[:, :, :1].long(),
    }
    order = balance_microbatches(batch, 4, 2, cost=[5, 5, 1, 1])
    assert order.tolist() == [0, 2, 1, 3]
    assert batch["pixel_values"][:, 0, 0].tolist() == [0.0, 2.0, 1.0, 3.0]
    assert batch["pixel_attention_mask"][:, 0, 0].tolist() == [0, 2, 1, 3]


def test_even_costs_keep_the_batch_and_copy_nothing() -> None:
    """When the collated order is already as even, nothing moves (same tensor objects)."""
    media = build_batch(example_spec("qwen", videos=False))
    batch = media.batch
    tensors = dict(batch)
    order = balance_microbatches(batch, 5, 5)  # one sample per microbatch: nothing to gain
    assert order.tolist() == list(range(5))
    assert all(batch[name] is tensor for name, tensor in tensors.items())
    order = balance_microbatches(batch, 5, 2, cost=[1, 1, 1, 1, 1])
    assert order.tolist() == list(range(5))
    assert all(batch[name] is tensor for name, tensor in tensors.items())


def test_deterministic_with_ties_broken_by_batch_index() -> None:
    costs = [5, 1, 5, 1, 5, 1, 5, 1, 3, 3]
    first = balance_microbatches({"input_ids": torch.arange(10)}, 10, 3, cost=costs)
    second = balance_microbatches({"input_ids": torch.arange(10)}, 10, 3, cost=list(costs))
    assert first.tolist() == second.tolist()
    for chunk in torch.tensor_split(first, 3):
        assert chunk.tolist() == sorted(chunk.tolist())  # batch order within a microbatch


def test_keys_limit_the_per_sample_fields() -> None:
    """M-RoPE position ids [3, B, T] with B=3: dim 0 is not the batch, so name the fields."""
    costs = [9, 8, 1]
    batch = {"input_ids": torch.arange(3).view(3, 1), "position_ids": torch.zeros(3, 3, 2)}
    position_ids = batch["position_ids"]
    order = balance_microbatches(batch, 3, 2, cost=costs, keys=("input_ids",))
    assert order.tolist() != [0, 1, 2]
    assert batch["position_ids"] is position_ids
    assert batch["input_ids"].view(-1).tolist() == order.tolist()


class _Collate:
    """Picklable collate: the fixed example batch of a layout."""

    def __init__(self, layout: str) -> None:
        self.layout = layout

    def __call__(self, examples: Any) -> dict[str, Any]:
        return build_batch(example_spec(self.layout, videos=True)).batch


def _heavy_last(batch: dict[str, Any]) -> torch.Tensor:
    """A cost function: later samples cost more (module level, so it pickles)."""
    return torch.arange(batch["input_ids"].shape[0]) ** 2


@pytest.mark.parametrize("balance_media", [True, _heavy_last])
def test_wrapped_collate_balances_pads_and_records_the_order(balance_media: Any) -> None:
    """B=5 in 4 microbatches, padded: the order has one entry per engine row, -1 for pads."""
    collate = pp_media.wrap_vlm_collate_for_pp(
        _Collate("qwen"), 4, even_microbatches=True, balance_media=balance_media
    )
    collate = pickle.loads(pickle.dumps(collate))
    batch = collate([])
    order = batch[VLM_PP_SAMPLE_ORDER_KEY]
    assert order.shape == batch["input_ids"].shape[:1] == (8,)
    real = order >= 0
    assert sorted(order[real].tolist()) == list(range(5))
    assert torch.equal(batch["input_ids"][real, 0], order[real])
    assert torch.all(batch["labels"][~real] == -100)
    original = _Collate("qwen")([])["input_ids"]
    assert torch.equal(restore_sample_order(batch["input_ids"], order), original)
    media = build_batch(example_spec("qwen", videos=True))
    chunks = batch[VLM_PP_MEDIA_KEY]
    for k, ids in enumerate(mb.engine_sample_chunks(batch["input_ids"], 4)):
        ids = [
            i for i, keep in zip(ids, torch.tensor_split(real, 4)[k].tolist(), strict=True) if keep
        ]
        assert torch.equal(chunks["pixel_values"][k], media.expected("pixel_values", ids))
        assert torch.equal(chunks["video_grid_thw"][k], media.expected("video_grid_thw", ids))


def test_wrapped_collate_rejects_other_balance_values() -> None:
    with pytest.raises(ValueError, match="balance_media"):
        pp_media.wrap_vlm_collate_for_pp(_Collate("qwen"), 2, balance_media="yes")  # type: ignore[arg-type]


def _qwen() -> dict[str, Any]:
    return build_batch(example_spec("qwen", videos=True)).batch


def _set(**fields: Any) -> Any:
    def make() -> dict[str, Any]:
        batch = _qwen()
        batch.update(fields)
        return {name: value for name, value in batch.items() if value is not None}

    return make


BAD_MEDIA = {
    "counts_sum": (_set(n_images_per_sample=torch.tensor([0, 1, 2, 0, 2])), "n_images_per_sample"),
    "negative_count": (
        _set(n_images_per_sample=torch.tensor([0, 1, 3, 0, -1])),
        "n_images_per_sample",
    ),
    "patches": (_set(pixel_values=torch.zeros(3, 4)), "pixel_values"),
    "negative_grid": (
        _set(image_grid_thw=torch.tensor([[1, 1, 2], [1, 2, 1], [2, 1, 1], [1, -1, 1]])),
        "image_grid_thw",
    ),
    "counts_shape": (_set(n_images_per_sample=torch.tensor([1, 1, 2])), "n_images_per_sample"),
    "float_grid": (_set(image_grid_thw=torch.ones(4, 3)), "image_grid_thw"),
    "no_video_grid": (_set(video_grid_thw=None), "pixel_values_videos"),
    "grid_alone": (_set(pixel_values=None, n_images_per_sample=None), "image_grid_thw"),
    "extra_rows": (_set(num_crops=torch.ones(3, dtype=torch.int64)), "num_crops"),
}


@pytest.mark.parametrize("path", PATHS[:2], ids=["host", "tensor"])
@pytest.mark.parametrize("case", sorted(BAD_MEDIA))
def test_bad_media_raise_like_the_core_and_leave_the_batch(
    case: str, path: tuple[int, int]
) -> None:
    make, field = BAD_MEDIA[case]
    batch = make()
    snapshot = {name: (value, value.clone()) for name, value in batch.items()}
    for balance in (balance_microbatches, pp_media.balance_and_prepare_vlm_media_for_pp):
        with _on_path(path), pytest.raises(ValueError, match=f"'{field}'"):
            balance(batch, 5, 2, cost=[9, 0, 0, 0, 9])
        assert batch.keys() == snapshot.keys()
        for name, (value, copy) in snapshot.items():
            assert batch[name] is value and torch.equal(value, copy), name
    with pytest.raises(ValueError, match=f"'{field}'"):
        prepare_vlm_media_for_pp(make(), 5, 2)


@pytest.mark.parametrize(
    "cost",
    [
        [1, 2, 3],
        [1.0, float("nan"), 0, 0, 0],
        [1, -2, 0, 0, 0],
        [True] * 5,
        "abc",
        torch.ones(5, 2),
    ],
)
@pytest.mark.parametrize("path", PATHS[:2], ids=["host", "tensor"])
def test_bad_costs_raise_and_leave_the_batch(cost: Any, path: tuple[int, int]) -> None:
    batch = _qwen()
    tensors = dict(batch)
    with _on_path(path), pytest.raises(ValueError, match="'cost'"):
        balance_microbatches(batch, 5, 2, cost=cost)
    assert all(batch[name] is tensor for name, tensor in tensors.items())


def test_prepared_batches_and_bad_sizes_are_refused() -> None:
    batch = prepare_vlm_media_for_pp(_qwen(), 5, 2)
    with pytest.raises(ValueError, match="before prepare_vlm_media_for_pp"):
        balance_microbatches(batch, 5, 2)
    with pytest.raises(ValueError, match="smaller than n_microbatches"):
        balance_microbatches(_qwen(), 5, 6)


def test_restore_sample_order_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="'values'"):
        restore_sample_order(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'order'"):
        restore_sample_order(torch.zeros(2), torch.tensor([0.0, 1.0]))


# --- real schedule, 2 gloo ranks -------------------------------------------------------------

#: fp32 summation order only (see test_staging_schedules.py): balancing changes which samples
#: share a microbatch, so token losses and gradient contributions add up in another order.
TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every run of ``balance_worker`` on 2 ranks, once; per rank, {run name: result}."""
    return spawn_ranks(
        balance_worker.worker,
        tmp_path_factory.mktemp("balance_runs"),
        world_size=balance_worker.WORLD_SIZE,
        timeout_s=180,
        what="the balanced pipeline runs",
    )


@given(batch_specs(), st.sampled_from(PATHS[1::2]))
def test_the_one_copy_read_of_an_accelerator_plans_the_same(spec: BatchSpec, path: Any) -> None:
    """The tensor plan's read for batches on an accelerator (sorted costs and sample indices in
    the same copy as the check values), run on the CPU: the same order and costs."""
    media = build_batch(spec)
    with _on_path(path):
        _, plan = media_plan._plan(media.batch, media.batch_size, 2, None)
        want = balance_module._permutation(plan, 2)
        with mock.patch.object(media_plan, "_is_host", lambda device: False):
            _, packed = media_plan._plan(media.batch, media.batch_size, 2, None)
            got = balance_module._permutation(packed, 2)
    if plan is None:
        assert packed is None
        return
    assert torch.equal(torch.as_tensor(packed.by_cost), torch.as_tensor(plan.by_cost))
    assert torch.equal(torch.as_tensor(packed.sorted_costs), torch.as_tensor(plan.sorted_costs))
    for got_rows, want_rows in zip(packed.group_rows, plan.group_rows, strict=True):
        for got_part, want_part in zip(got_rows, want_rows, strict=True):
            assert (got_part is None) == (want_part is None)
            if got_part is not None:  # the per-sample rows the split reads came in the copy
                assert torch.equal(torch.as_tensor(got_part), torch.as_tensor(want_part))
    assert (got is None) == (want is None)
    assert got is None or torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", PATHS)
def test_planning_on_cuda_synchronises_once(path: tuple[int, int]) -> None:
    """On a GPU, planning (validation, costs, assignment, order) reads the device once."""
    media = build_batch(example_spec("qwen", videos=True))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in media.batch.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with _on_path(path), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, plan = media_plan._plan(batch, media.batch_size, 2, None)
            balance_module._permutation(plan, 2)
        with _on_path(path), warnings.catch_warnings(record=True) as fused:
            warnings.simplefilter("always")
            planned = balanced_module._plan_balanced_split(
                batch, media.batch_size, 2, None, pp_media.SEED_LAYOUT
            )
            for reading, items, rows in planned[3]:
                split_group(reading, items, rows, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warned in (caught, fused):  # balancing alone; balancing and the split's offsets
        syncs = [w for w in warned if "synchronizing" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("key", sorted(balance_worker.CASES))
def test_balanced_step_equals_the_collated_order(
    pipeline_runs: list[dict[str, Any]], key: str
) -> None:
    """Same loss and every gradient (and both equal the single-process model's)."""
    natural = case_results(pipeline_runs, f"{key}/natural")
    balanced = case_results(pipeline_runs, f"{key}/balanced")
    order = balanced[0]["order"]
    assert [i for i in order if i >= 0] != list(range(len([i for i in order if i >= 0])))
    losses = [
        (n["loss"], b["loss"], b["ref_loss"])
        for n, b in zip(natural, balanced, strict=True)
        if "loss" in n
    ]
    assert len(losses) == 1
    loss_natural, loss_balanced, loss_ref = losses[0]
    assert loss_balanced == pytest.approx(loss_natural, abs=TOLERANCE, rel=0)
    assert loss_balanced == pytest.approx(loss_ref, abs=TOLERANCE, rel=0)
    for n, b in zip(natural, balanced, strict=True):
        assert n["grads"].keys() == b["grads"].keys() and n["grads"]
        for name in n["grads"]:
            got = torch.tensor(b["grads"][name])
            assert torch.allclose(got, torch.tensor(n["grads"][name]), atol=TOLERANCE, rtol=0)
            assert torch.allclose(got, torch.tensor(b["ref_grads"][name]), atol=TOLERANCE, rtol=0)
    # Every stage-0 forward of the balanced step got the media of its own samples only.
    for forward in balanced[0]["log"]:
        samples = set(forward["sample_ids"]) - {0}
        assert set(forward["pixel_owner"]) <= samples
