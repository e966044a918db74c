"""Layouts described as data: random ``MediaLayout`` descriptions split as the engine splits
their samples, balance with their media, and the fused balance+split equals the two in turn."""

from __future__ import annotations

import contextlib
import re
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pp_media
from pp_media import (
    VLM_PP_MEDIA_KEY,
    CountRows,
    MediaGroup,
    MediaLayout,
    balance_and_prepare_vlm_media_for_pp,
    balance_microbatches,
    prepare_vlm_media_for_pp,
)
from pp_media._core import media_plan, row_maps
from tests.helpers import media_batches as mb
from tests.helpers.strategies import LayoutCase, layout_cases

#: (row_maps.HOST_SUM_MAX, media_plan._HOST_PLAN_MAX, media_plan._PYTHON_ROUND_MAX): the host
#: and the tensor ways of the split and of the plan.
PATHS = ((10**9, 10**9, 10**9), (0, 0, 0), (10**9, 0, 10**9), (0, 10**9, 0))


def _on_path(path: tuple[int, int, int]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(row_maps, "HOST_SUM_MAX", path[0]))
    stack.enter_context(mock.patch.object(media_plan, "_HOST_PLAN_MAX", path[1]))
    stack.enter_context(mock.patch.object(media_plan, "_PYTHON_ROUND_MAX", path[2]))
    return stack


def _assert_chunks(case: LayoutCase, batch: dict[str, Any]) -> None:
    """Chunk k of every described field holds the rows of the samples the engine gives k."""
    chunks = batch[VLM_PP_MEDIA_KEY]
    assert set(chunks) == set(case.rows)
    assert not set(case.rows) & set(batch)
    samples = mb.engine_sample_chunks(batch["input_ids"], case.n_microbatches)
    for name in case.rows:
        assert len(chunks[name]) == case.n_microbatches, name
        for k, ids in enumerate(samples):
            want = case.expected(name, ids)
            assert torch.equal(chunks[name][k], want), f"{name}[{k}] (samples {ids})"


@given(layout_cases(), st.sampled_from(PATHS))
def test_described_layouts_split_as_the_engine_splits_their_samples(
    case: LayoutCase, path: Any
) -> None:
    batch = case.batch
    originals = dict(batch)
    with _on_path(path):
        prepare_vlm_media_for_pp(batch, case.batch_size, case.n_microbatches, layout=case.layout)
    _assert_chunks(case, batch)
    for name, chunks in batch[VLM_PP_MEDIA_KEY].items():
        for chunk in chunks:
            if chunk.numel():  # zero-copy: views of the collated tensor
                assert chunk.untyped_storage().data_ptr() == originals[name].data_ptr(), name


@given(layout_cases(), st.sampled_from(PATHS), st.data())
def test_described_media_stay_with_their_samples_when_balanced(
    case: LayoutCase, path: Any, data: Any
) -> None:
    """The fused path: a permutation, media with their samples, and exactly what balancing then
    preparing gives (the same order, the same chunks)."""
    b, m = case.batch_size, case.n_microbatches
    cost = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=b, max_size=b)))
    fused, apart = case.batch, case.batch
    with _on_path(path):
        order = balance_and_prepare_vlm_media_for_pp(fused, b, m, cost=cost, layout=case.layout)
        order_apart = balance_microbatches(apart, b, m, cost=cost, layout=case.layout)
        prepare_vlm_media_for_pp(apart, b, m, layout=case.layout)
    assert sorted(order.tolist()) == list(range(b))
    assert fused["input_ids"][:, 0].tolist() == order.tolist() == order_apart.tolist()
    _assert_chunks(case, fused)
    for name, chunks in apart[VLM_PP_MEDIA_KEY].items():
        for got, want in zip(fused[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert torch.equal(got, want), name


def test_the_seed_layout_is_the_default() -> None:
    """A layout the core ships: the seed's fields, in the seed's order."""
    assert pp_media.SEED_LAYOUT.media_fields == pp_media._VLM_MEDIA_KEYS
    pixel_groups = [g for g in pp_media.SEED_LAYOUT.groups if g.pixels == "pixel_values"]
    assert [bool(g.when) for g in pixel_groups] == [True, True, False]


TILES = MediaLayout(
    (MediaGroup("pixel_values", items="n_images_per_sample", rows=CountRows("num_patches")),)
)


def _tiles_batch() -> dict[str, torch.Tensor]:
    """InternVL-style: 3 samples with 1, 0 and 2 images of 2, 1 and 3 tiles."""
    return {
        "input_ids": torch.zeros(3, 2, dtype=torch.long),
        "pixel_values": torch.arange(6.0).view(6, 1),
        "num_patches": torch.tensor([2, 1, 3]),
        "n_images_per_sample": torch.tensor([1, 0, 2]),
    }


def test_a_count_of_rows_per_item_needs_no_fake_grid() -> None:
    batch = prepare_vlm_media_for_pp(_tiles_batch(), 3, 2, layout=TILES)
    media = batch[VLM_PP_MEDIA_KEY]
    assert [c.view(-1).tolist() for c in media["pixel_values"]] == [
        [0.0, 1.0],
        [2.0, 3.0, 4.0, 5.0],
    ]
    assert [c.tolist() for c in media["num_patches"]] == [[2], [1, 3]]
    assert set(batch) == {"input_ids", VLM_PP_MEDIA_KEY}


@pytest.mark.parametrize(
    ("changes", "parts"),
    [
        (
            {"pixel_values": torch.zeros(5, 1)},
            (
                "'pixel_values' (shape (5, 1)",
                "expected dim 0 of size 6: the patches described "
                "by 'num_patches' (shape (3,), the sum of its entries)",
            ),
        ),
        (
            {"num_patches": torch.tensor([2, -1, 5])},
            ("'num_patches' (shape (3,)", "expected non-negative row counts"),
        ),
        (
            {"num_patches": torch.tensor([[2, 1, 3]])},
            ("'num_patches' (shape (1, 3)", "expected a 1-D integer tensor"),
        ),
        (
            {"n_images_per_sample": torch.tensor([1, 1, 2])},
            ("'n_images_per_sample'", "expected counts that sum to 3, the rows of 'num_patches'"),
        ),
    ],
)
def test_a_described_layout_names_its_own_fields_in_errors(changes: Any, parts: Any) -> None:
    batch = {**_tiles_batch(), **changes}
    before = dict(batch)
    pattern = ".*".join(re.escape(part) for part in parts)
    with pytest.raises(ValueError, match=pattern):
        prepare_vlm_media_for_pp(batch, 3, 2, layout=TILES)
    assert batch.keys() == before.keys() and all(batch[k] is v for k, v in before.items())


def test_bad_descriptions_and_layout_values_are_refused() -> None:
    with pytest.raises(ValueError, match="missing_items must be 0 or 1"):
        MediaGroup("pixels", missing_items=2)
    with pytest.raises(ValueError, match=re.escape("item_pixels ['crops'] must also be listed")):
        MediaGroup("pixels", item_pixels=("crops",))
    with pytest.raises(ValueError, match="names fields that no group has"):
        MediaLayout((MediaGroup("pixels"),), field_order=("pixels", "other"))
    with pytest.raises(
        TypeError, match=re.escape("layout must be a pp_media.MediaLayout, got dict")
    ):
        pp_media.wrap_vlm_collate_for_pp(lambda x: x, 2, layout={})  # type: ignore[arg-type]
