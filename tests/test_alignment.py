"""Invariant 1: microbatch k's media are exactly the media of the engine's microbatch k.

Every check compares the chunks with ``split_args_kwargs_into_chunks`` (the split that
``torch.distributed.pipelining`` applies to ``input_ids``) on the same batch; the media values
name their owner sample, so a chunk either holds exactly its samples' rows, in order, or fails.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pp_media import (
    VLM_PP_MEDIA_KEY,
    chunk_step3_media,
    chunk_vlm_media,
    prepare_vlm_media_for_pp,
)
from tests.helpers import media_batches as mb
from tests.helpers.strategies import (
    GRID_KEY,
    GRID_LAYOUTS,
    BatchSpec,
    batch_specs,
    build_batch,
)


def _prepared_chunks(media: mb.MediaBatch, n_microbatches: int) -> dict[str, list[torch.Tensor]]:
    out = prepare_vlm_media_for_pp(media.batch, media.batch_size, n_microbatches)
    assert out is media.batch
    return out[VLM_PP_MEDIA_KEY]


@given(batch_specs())
def test_prepare_follows_engine_split(spec: BatchSpec) -> None:
    """Every layout, with or without videos, B >= M: chunks match the engine's microbatches."""
    media = build_batch(spec)
    chunks = _prepared_chunks(media, spec.n_microbatches)
    mb.assert_chunks_aligned(chunks, media, spec.n_microbatches)


@given(batch_specs(videos=True))
def test_prepare_images_and_videos_together(spec: BatchSpec) -> None:
    """Images of any layout and videos in one batch each follow the engine's split."""
    media = build_batch(spec)
    assert "pixel_values_videos" in media.batch
    chunks = _prepared_chunks(media, spec.n_microbatches)
    mb.assert_chunks_aligned(chunks, media, spec.n_microbatches)


@given(batch_specs(layouts=GRID_LAYOUTS, videos=False))
def test_chunk_vlm_media_follows_engine_split(spec: BatchSpec) -> None:
    """``chunk_vlm_media`` on each grid layout, with and without per-sample counts."""
    media = build_batch(spec)
    grid_key = GRID_KEY[spec.layout]
    batch = media.batch
    pixel_chunks, grid_chunks = chunk_vlm_media(
        batch["pixel_values"],
        batch[grid_key],
        spec.batch_size,
        spec.n_microbatches,
        batch.get("n_images_per_sample"),
    )
    media.per_sample.pop("n_images_per_sample", None)
    chunks = {"pixel_values": pixel_chunks, grid_key: grid_chunks}
    mb.assert_chunks_aligned(chunks, media, spec.n_microbatches)


@given(batch_specs(layouts=("step3", "step3_flat", "plain"), videos=False))
def test_chunk_step3_media_follows_engine_split(spec: BatchSpec) -> None:
    """``chunk_step3_media``: full images or flat crops, optional fields, default num_patches."""
    media = build_batch(spec)
    batch = media.batch
    chunks = chunk_step3_media(
        batch["pixel_values"],
        spec.batch_size,
        spec.n_microbatches,
        num_patches=batch.get("num_patches"),
        patch_pixel_values=batch.get("patch_pixel_values"),
        patch_newline_mask=batch.get("patch_newline_mask"),
    )
    if "num_patches" not in batch:  # documented default: zero crops per sample
        media.per_sample["num_patches"] = [
            torch.zeros(1, dtype=torch.int64) for _ in range(spec.batch_size)
        ]
    mb.assert_chunks_aligned(chunks, media, spec.n_microbatches)


@given(
    st.integers(1, 12).flatmap(lambda m: st.tuples(st.just(m), st.integers(m, 40))),
    st.data(),
)
def test_text_only_samples_anywhere(sizes: tuple[int, int], data: st.DataObject) -> None:
    """Microbatches made only of text-only samples get empty chunks, wherever they fall."""
    n_microbatches, batch_size = sizes
    has_image = data.draw(st.lists(st.booleans(), min_size=batch_size, max_size=batch_size))
    counts = [int(flag) for flag in has_image]
    media = mb.combine(batch_size, mb.qwen_images(counts, [(1, 2, 2)] * sum(counts)))
    chunks = _prepared_chunks(media, n_microbatches)
    mb.assert_chunks_aligned(chunks, media, n_microbatches)
    samples = mb.engine_sample_chunks(media.originals["input_ids"], n_microbatches)
    for k, ids in enumerate(samples):
        assert chunks["pixel_values"][k].shape[0] == 4 * sum(counts[i] for i in ids)


def _sweep_counts(batch_size: int) -> list[int]:
    """Deterministic 0..3 images per sample; sample 0 is always text-only."""
    return [0] + [(3 * i + batch_size) % 4 for i in range(1, batch_size)]


def _sweep_grids(n_images: int) -> list[tuple[int, int, int]]:
    return [(1 + g % 2, 1 + g % 3, 2 + g % 2) for g in range(n_images)]


SWEEP = [(b, m) for b in range(1, 13) for m in range(1, b + 1)]


@pytest.mark.parametrize(("batch_size", "n_microbatches"), SWEEP)
def test_flat_layout_exhaustive_sweep(batch_size: int, n_microbatches: int) -> None:
    """All B <= 12, 1 <= M <= B (78 pairs): flat images plus videos, prepare and chunk."""
    counts = _sweep_counts(batch_size)
    video_counts = [(i + 1) % 3 == 0 for i in range(batch_size)]
    groups = (
        mb.qwen_images(counts, _sweep_grids(sum(counts))),
        mb.qwen_videos([int(v) for v in video_counts], _sweep_grids(sum(video_counts))),
    )
    media = mb.combine(batch_size, *groups)
    pixel_chunks, grid_chunks = chunk_vlm_media(
        media.batch["pixel_values"],
        media.batch["image_grid_thw"],
        batch_size,
        n_microbatches,
        media.batch["n_images_per_sample"],
    )
    direct = {"pixel_values": pixel_chunks, "image_grid_thw": grid_chunks}
    image_only = mb.MediaBatch(
        dict(media.batch),
        {k: media.per_sample[k] for k in ("pixel_values", "image_grid_thw")},
    )
    mb.assert_chunks_aligned(direct, image_only, n_microbatches)
    mb.assert_chunks_aligned(_prepared_chunks(media, n_microbatches), media, n_microbatches)


@pytest.mark.parametrize(("batch_size", "n_microbatches"), SWEEP)
def test_one_image_per_sample_sweep(batch_size: int, n_microbatches: int) -> None:
    """All B <= 12, 1 <= M <= B for the per-sample layouts (legacy flat and [B, C, H, W])."""
    for group in (
        mb.qwen_legacy_images(_sweep_grids(batch_size)),
        mb.images_4d_per_sample(batch_size),
        mb.step3_images([i % 3 for i in range(batch_size)]),
    ):
        media = mb.combine(batch_size, group)
        mb.assert_chunks_aligned(_prepared_chunks(media, n_microbatches), media, n_microbatches)
