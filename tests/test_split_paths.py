"""The split's three ways to its offsets give the same chunks, checks and errors.

``prepare_vlm_media_for_pp`` takes the common layout (flat patches, a 2-D grid, per-sample
counts, nothing else) through ``split_flat_counted`` and every other one through
``plan_media_group``; each of them sums small batches on the host and reduces large ones on the
device first (``HOST_SUM_MAX``). The other test files run small batches; here each case also
runs with ``HOST_SUM_MAX = 0`` (the device reduction) and the fast path is checked to be taken,
to decline what it does not handle, and to leave every error to the general path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given

from pp_media import VLM_PP_MEDIA_KEY, chunk_vlm_media, prepare_vlm_media_for_pp
from pp_media._core import chunking, prepare, row_maps
from pp_media._core.row_maps import split_flat_counted
from tests.helpers import media_batches as mb
from tests.helpers.strategies import BatchSpec, batch_specs, build_batch, example_spec
from tests.test_errors import CASES, Case, _assert_untouched, _pattern, _snapshot
from tests.test_zero_copy import _assert_views, host_reads

PATHS = {"host sums": row_maps.HOST_SUM_MAX, "device reduction": 0}


@contextmanager
def host_sum_max(value: int) -> Iterator[None]:
    """Run the block with ``row_maps.HOST_SUM_MAX = value`` (0: always reduce on the device)."""
    saved = row_maps.HOST_SUM_MAX
    row_maps.HOST_SUM_MAX = value
    try:
        yield
    finally:
        row_maps.HOST_SUM_MAX = saved


def _flat_images(batch_size: int = 5, n_microbatches: int = 2) -> mb.MediaBatch:
    """The common layout only: pixel_values, image_grid_thw, n_images_per_sample."""
    return build_batch(example_spec("qwen", n_microbatches=n_microbatches, videos=False))


def _layout(chunks: dict[str, list[torch.Tensor]]) -> dict[str, list[tuple[Any, ...]]]:
    """Per field and chunk: shape, storage offset, values (enough to say two splits agree)."""
    return {
        name: [(tuple(c.shape), c.storage_offset(), c.tolist()) for c in field]
        for name, field in chunks.items()
    }


@given(batch_specs())
def test_device_reduction_matches_host_sums(spec: BatchSpec) -> None:
    """Every layout, with and without videos: both ways give the same aligned views."""
    media = build_batch(spec)
    results = []
    for limit in PATHS.values():
        batch = dict(media.batch)
        with host_sum_max(limit):
            prepare_vlm_media_for_pp(batch, spec.batch_size, spec.n_microbatches)
        mb.assert_chunks_aligned(batch[VLM_PP_MEDIA_KEY], media, spec.n_microbatches)
        results.append(_layout(batch[VLM_PP_MEDIA_KEY]))
    assert results[0] == results[1]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_errors_on_both_paths(case: Case, path: str) -> None:
    """Each bad batch of test_errors raises the same message on both paths, batch untouched."""
    batch = case.build()
    snapshot = _snapshot(batch)
    with host_sum_max(PATHS[path]), pytest.raises(ValueError, match=_pattern(case.parts)):
        prepare_vlm_media_for_pp(batch, case.batch_size, case.n_microbatches)
    _assert_untouched(batch, snapshot)


FAST_PATH_ERRORS = {
    "negative-count": (
        {"n_images_per_sample": torch.tensor([0, 3, -1, 1, 1])},
        ("'n_images_per_sample'", "shape (5,)", "expected non-negative", "minimum is -1"),
    ),
    "negative-grid-entry": (
        {"image_grid_thw": torch.tensor([[1, 1, 2], [1, 2, 1], [2, 1, 1], [1, -1, 1]])},
        ("'image_grid_thw'", "shape (4, 3)", "expected non-negative grid entries"),
    ),
    "counts-do-not-sum-to-grid-rows": (
        {"n_images_per_sample": torch.tensor([0, 1, 2, 0, 2])},
        ("'n_images_per_sample'", "expected counts that sum to 4", "They sum to 5."),
    ),
    "patches-do-not-match-grid": (
        {"pixel_values": lambda b: b["pixel_values"][:-1]},
        ("'pixel_values'", "expected dim 0 of size 7", "'image_grid_thw'"),
    ),
    "grid-three-dims": (
        {"image_grid_thw": lambda b: b["image_grid_thw"][:, None]},
        ("'image_grid_thw'", "shape (4, 1, 3)", "expected a 2-D integer tensor"),
    ),
    "counts-wrong-length": (
        {"n_images_per_sample": torch.tensor([0, 1, 2, 1])},
        ("'n_images_per_sample'", "shape (4,)", "expected dim 0 of size 5"),
    ),
    "float-counts": (
        {"n_images_per_sample": torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0])},
        ("'n_images_per_sample'", "dtype torch.float32", "expected a 1-D integer tensor"),
    ),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("error", FAST_PATH_ERRORS)
def test_common_layout_errors(error: str, path: str) -> None:
    """Bad batches of the fast path's own layout get the general path's message, untouched."""
    changes, parts = FAST_PATH_ERRORS[error]
    batch = _flat_images().batch
    for key, value in changes.items():
        batch[key] = value(batch) if callable(value) else value
    snapshot = _snapshot(batch)
    with host_sum_max(PATHS[path]), pytest.raises(ValueError, match=_pattern(parts)):
        prepare_vlm_media_for_pp(batch, 5, 2)
    _assert_untouched(batch, snapshot)
    with host_sum_max(PATHS[path]), pytest.raises(ValueError, match=_pattern(parts)):
        chunk_vlm_media(
            batch["pixel_values"],
            batch["image_grid_thw"],
            5,
            2,
            batch["n_images_per_sample"],
            grid_name="image_grid_thw",
        )


def _no_general_path(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the common layout took the general path")


@pytest.mark.parametrize("path", PATHS)
def test_common_layout_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Flat images + grid + counts: no general plan, one host read, aligned views."""
    monkeypatch.setattr(prepare, "plan_media_group", _no_general_path)
    monkeypatch.setattr(chunking, "plan_media_group", _no_general_path)
    for layout, grid in (("qwen", "image_grid_thw"), ("kimi", "image_grid_hws")):
        media = build_batch(example_spec(layout, n_microbatches=3, videos=False))
        batch = dict(media.batch)
        with host_sum_max(PATHS[path]), host_reads() as reads:
            prepare_vlm_media_for_pp(batch, 5, 3)
        assert reads == ["tolist"]
        chunks = batch[VLM_PP_MEDIA_KEY]
        assert list(chunks) == ["pixel_values", grid, "n_images_per_sample"]
        mb.assert_chunks_aligned(chunks, media, 3)
        with host_sum_max(PATHS[path]):
            pixel_chunks, grid_chunks = chunk_vlm_media(
                media.batch["pixel_values"],
                media.batch[grid],
                5,
                3,
                media.batch["n_images_per_sample"],
            )
        assert _layout({"p": pixel_chunks, "g": grid_chunks}) == _layout(
            {"p": chunks["pixel_values"], "g": chunks[grid]}
        )
        # Last: it writes into the batch's tensors.
        _assert_views(chunks, {name: media.batch[name] for name in chunks})


def test_fast_path_declines_what_it_does_not_handle() -> None:
    """None (the general path decides) for other types, dims, dtypes, per-item rows, values."""
    batch = _flat_images().batch
    pixels, grid, counts = (
        batch["pixel_values"],
        batch["image_grid_thw"],
        batch["n_images_per_sample"],
    )
    assert split_flat_counted(pixels, grid, counts, 5, 2) is not None
    declined = {
        "grid list": (pixels, grid.tolist(), counts),
        "counts list": (pixels, grid, counts.tolist()),
        "3-D grid": (pixels, grid[:, None], counts),
        "bool counts": (pixels, grid, counts.bool()),
        "float grid": (pixels, grid.float(), counts),
        "2-D counts": (pixels, grid, counts[:, None]),
        "one row per image": (pixels[:4], grid, counts),
        "0-D pixels": (torch.tensor(1.0), grid, counts),
        "counts wrong length": (pixels, grid, counts[:4]),
        "negative count": (pixels, grid, torch.tensor([0, 2, -1, 2, 1])),
        "counts sum": (pixels, grid, torch.tensor([0, 1, 2, 0, 2])),
        "patch sum": (pixels[:-1], grid, counts),
    }
    for limit in PATHS.values():
        with host_sum_max(limit):
            for name, args in declined.items():
                assert split_flat_counted(*args, 5, 2) is None, name


def test_other_layouts_keep_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Videos, a second grid or per-item extras beside the images: never the fast path."""
    monkeypatch.setattr(prepare, "split_flat_counted", _no_general_path)
    with_videos = build_batch(example_spec("qwen", videos=True))
    prepare_vlm_media_for_pp(with_videos.batch, 5, 2)
    mb.assert_chunks_aligned(with_videos.batch[VLM_PP_MEDIA_KEY], with_videos, 2)
    for extra in ("image_sizes", "num_crops"):
        batch = _flat_images().batch
        batch[extra] = torch.ones(4, 2, dtype=torch.int64)
        prepare_vlm_media_for_pp(batch, 5, 2)
        assert len(batch[VLM_PP_MEDIA_KEY][extra]) == 2


@pytest.mark.parametrize("videos", [False, True])
def test_device_reduction_reads_the_host_once(videos: bool) -> None:
    """Large-batch way: one ``tolist`` for the whole batch, images and videos together."""
    media = build_batch(example_spec("qwen", n_microbatches=3, videos=videos))
    with host_sum_max(0), host_reads() as reads:
        prepare_vlm_media_for_pp(media.batch, 5, 3)
    assert reads == ["tolist"]


def test_large_batch_default_threshold() -> None:
    """A batch above HOST_SUM_MAX, unpatched: the device reduction, aligned, text-only runs."""
    batch_size = row_maps.HOST_SUM_MAX
    counts = [0 if i % 7 < 3 else 1 + i % 3 for i in range(batch_size)]
    grids = [(1, 1 + g % 2, 1 + g % 3) for g in range(sum(counts))]
    media = mb.combine(batch_size, mb.qwen_images(counts, grids))
    assert batch_size + sum(counts) > row_maps.HOST_SUM_MAX
    prepare_vlm_media_for_pp(media.batch, batch_size, 24)
    mb.assert_chunks_aligned(media.batch[VLM_PP_MEDIA_KEY], media, 24)
