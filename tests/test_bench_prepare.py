"""The floor plan of ``benchmarks/bench_prepare.py`` (D): it must do the work it claims, so
that ``(D - A) / A`` is a floor on a correct planner's cost and not on less."""

from __future__ import annotations

import pytest
import torch

from pp_media import VLM_PP_MEDIA_KEY, prepare_vlm_media_for_pp
from tests.helpers.benchmarks import loaded_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from loaded_benchmark("bench_prepare")


@pytest.mark.parametrize(("batch_size", "n_microbatches"), [(8, 4), (13, 4), (64, 16), (300, 7)])
def test_floor_views_split_the_batch_in_its_order(bench, batch_size, n_microbatches) -> None:
    """Both forms (host lists, tensors) give the same permutation, and their views have the
    sizes of those ``prepare_vlm_media_for_pp`` makes of the batch re-ordered by it (the views
    themselves are of the collated tensors, as the benchmark's C takes them: the copy that
    applies the order is timed apart)."""
    batch = bench.make_batch(batch_size, seed=batch_size)
    media = batch.media
    fields = (media["pixel_values"], media["image_grid_thw"], media["n_images_per_sample"])
    forms = (bench._floor_lists, bench._floor_tensors)
    (order, *offsets), (other, *other_offsets) = (
        f(*fields, batch_size, n_microbatches) for f in forms
    )
    assert sorted(order.tolist()) == list(range(batch_size))
    assert torch.equal(order, other)
    assert [list(o) for o in offsets] == [list(o) for o in other_offsets]
    # Round-robin over the costs, largest first: microbatch k gets sorted positions k, k + M, ...
    costs = bench.pp_media.media_cost_per_sample(dict(media), batch_size)
    by_cost = sorted(range(batch_size), key=lambda i: (-int(costs[i]), i))
    for k, chunk in enumerate(torch.tensor_split(order, n_microbatches)):
        assert chunk.tolist() == sorted(by_cost[k::n_microbatches])

    planned, views = bench.floor_plan(dict(media), batch_size, n_microbatches)
    assert torch.equal(planned, order)
    grid, counts = media["image_grid_thw"], media["n_images_per_sample"]
    owner = torch.repeat_interleave(torch.arange(batch_size), counts)
    item_order = torch.cat([torch.nonzero(owner == i).flatten() for i in order.tolist()])
    rows = grid.prod(dim=1)
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), rows.cumsum(0)[:-1]))
    pixels = torch.arange(int(rows.sum())).view(-1, 1)  # row ids stand in for the patches
    permuted = {
        "pixel_values": torch.cat([pixels[starts[j] : starts[j] + rows[j]] for j in item_order]),
        "image_grid_thw": grid[item_order],
        "n_images_per_sample": counts[order],
    }
    expected = prepare_vlm_media_for_pp(permuted, batch_size, n_microbatches)[VLM_PP_MEDIA_KEY]
    names = ("pixel_values", "image_grid_thw", "n_images_per_sample")
    for name, got in zip(names, views, strict=True):
        assert [view.shape[0] for view in got] == [c.shape[0] for c in expected[name]], name
