"""Invariant 3: bad input raises a ValueError that names the field, its shape and what was
expected, and leaves the caller's batch exactly as it was (every key, the same tensors)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pp_media import (
    VLM_PP_MEDIA_KEY,
    chunk_step3_media,
    chunk_vlm_media,
    prepare_vlm_media_for_pp,
    wrap_vlm_collate_for_pp,
)
from tests.helpers import media_batches as mb

B = 4
IMAGE_COUNTS = [0, 2, 1, 1]
IMAGE_GRIDS = [(1, 2, 2), (1, 1, 2), (1, 1, 1), (2, 1, 1)]  # 4 + 2 + 1 + 2 = 9 patches
VIDEO_COUNTS = [1, 0, 0, 1]
VIDEO_GRIDS = [(1, 1, 2), (1, 2, 1)]  # 2 + 2 = 4 patches of shape (2, 3)


def qwen_batch() -> dict[str, Any]:
    """A valid batch: 4 samples, flat images (9 patches of 4) and videos (4 patches of 2x3)."""
    return mb.combine(
        B, mb.qwen_images(IMAGE_COUNTS, IMAGE_GRIDS), mb.qwen_videos(VIDEO_COUNTS, VIDEO_GRIDS)
    ).batch


def step3_batch() -> dict[str, Any]:
    """A valid Step3 batch: full images [4, 3, 2, 2], num_patches [0, 2, 1, 1], 4 crops."""
    return mb.combine(B, mb.step3_images([0, 2, 1, 1])).batch


def plain_batch() -> dict[str, Any]:
    """A valid LLaVA-1.5 style batch: only ``pixel_values [4, 3, 2, 2]``."""
    return mb.combine(B, mb.plain_images(B)).batch


def per_image_batch() -> dict[str, Any]:
    """A valid batch of per-image ``pixel_values [4, 3, 2, 2]`` mapped by counts, no grid."""
    return mb.combine(B, mb.per_image_counted_images(IMAGE_COUNTS)).batch


def edit(base: Callable[[], dict[str, Any]], **changes: Any) -> Callable[[], dict[str, Any]]:
    """``base()`` with fields replaced; a value of ``None`` deletes the field."""

    def build() -> dict[str, Any]:
        batch = base()
        for key, value in changes.items():
            if value is None:
                del batch[key]
            else:
                batch[key] = value(batch) if callable(value) else value
        return batch

    return build


def _more_rows(n: int) -> Callable[[dict[str, Any]], torch.Tensor]:
    return lambda batch: torch.cat([batch["pixel_values"], batch["pixel_values"][:n]])


@dataclass(frozen=True)
class Case:
    """One bad batch and the parts its error message must contain, in order."""

    id: str
    build: Callable[[], dict[str, Any]]
    parts: tuple[str | re.Pattern[str], ...]
    n_microbatches: int = 2
    batch_size: int = B


CASES = [
    Case(
        "patches-do-not-match-grid",
        edit(qwen_batch, pixel_values=_more_rows(1)),
        ("'pixel_values'", "shape (10, 4)", "expected dim 0 of size 9", "'image_grid_thw'"),
    ),
    Case(
        "video-patches-do-not-match-grid",
        edit(qwen_batch, pixel_values_videos=lambda b: b["pixel_values_videos"][:3]),
        (
            "'pixel_values_videos'",
            "shape (3, 2, 3)",
            "expected dim 0 of size 4",
            "'video_grid_thw'",
        ),
    ),
    Case(
        "counts-do-not-sum-to-grid-rows",
        edit(qwen_batch, n_images_per_sample=torch.tensor([0, 2, 1, 2])),
        (
            "'n_images_per_sample'",
            "shape (4,)",
            "expected counts that sum to 4",
            "'image_grid_thw'",
        ),
    ),
    Case(
        "video-counts-do-not-sum-to-grid-rows",
        edit(qwen_batch, n_videos_per_sample=torch.tensor([1, 0, 0, 0])),
        (
            "'n_videos_per_sample'",
            "shape (4,)",
            "expected counts that sum to 2",
            "'video_grid_thw'",
        ),
    ),
    Case(
        "counts-wrong-length",
        edit(qwen_batch, n_images_per_sample=torch.tensor([0, 2, 1, 1, 0])),
        ("'n_images_per_sample'", "shape (5,)", "expected dim 0 of size 4", "one count per sample"),
    ),
    Case(
        "counts-negative",
        edit(qwen_batch, n_images_per_sample=torch.tensor([0, 3, -1, 2])),
        ("'n_images_per_sample'", "shape (4,)", "expected non-negative"),
    ),
    Case(
        "counts-bool",
        edit(qwen_batch, n_images_per_sample=torch.tensor([False, True, True, True])),
        ("'n_images_per_sample'", "shape (4,), dtype torch.bool", "expected a 1-D integer tensor"),
    ),
    Case(
        "videos-without-video-grid",
        edit(qwen_batch, video_grid_thw=None),
        (
            "'n_videos_per_sample'",
            "the rows of 'pixel_values_videos' (shape (4, 2, 3))",
            "Flat patches need their grid beside them ('video_grid_thw').",
        ),
    ),
    Case(
        "video-grid-without-videos",
        edit(qwen_batch, pixel_values_videos=None),
        ("'video_grid_thw'", "shape (2, 3)", "expected to come with 'pixel_values_videos'"),
    ),
    Case(
        "float-grid",
        edit(qwen_batch, image_grid_thw=lambda b: b["image_grid_thw"].float()),
        ("'image_grid_thw'", "shape (4, 3), dtype torch.float32", "expected a 2-D integer tensor"),
    ),
    Case(
        "one-dimensional-grid",
        edit(qwen_batch, image_grid_thw=torch.tensor([1, 2, 2])),
        ("'image_grid_thw'", "shape (3,)", "expected a 2-D integer tensor"),
    ),
    Case(
        "negative-grid-entries",
        edit(
            qwen_batch, image_grid_thw=torch.tensor([[1, 2, 2], [1, 1, 2], [1, 1, 1], [2, -1, 1]])
        ),
        ("'image_grid_thw'", "shape (4, 3)", "expected non-negative grid entries"),
    ),
    Case(
        "grid-rows-are-not-samples-without-counts",
        edit(
            qwen_batch, n_images_per_sample=None, image_grid_thw=lambda b: b["image_grid_thw"][:3]
        ),
        ("'image_grid_thw'", "shape (3, 3)", "expected 4 rows (one item per sample)"),
    ),
    Case(
        "second-grid-wrong-rows",
        edit(qwen_batch, image_sizes=torch.ones(3, 2, dtype=torch.int64)),
        ("'image_sizes'", "shape (3, 2)", "expected dim 0 of size 4"),
    ),
    Case(
        "per-image-counts-do-not-sum-to-images",
        edit(per_image_batch, n_images_per_sample=torch.tensor([0, 2, 1, 2])),
        ("'n_images_per_sample'", "shape (4,)", "expected counts that sum to 4", "'pixel_values'"),
    ),
    Case(
        "pixel-values-list",
        edit(qwen_batch, pixel_values=lambda b: b["pixel_values"].tolist()),
        ("'pixel_values'", "type list", "expected a torch.Tensor"),
    ),
    Case(
        "grid-list",
        edit(qwen_batch, image_grid_thw=[list(g) for g in IMAGE_GRIDS]),
        ("'image_grid_thw'", "type list", "expected a torch.Tensor"),
    ),
    Case(
        "counts-list",
        edit(qwen_batch, n_images_per_sample=list(IMAGE_COUNTS)),
        ("'n_images_per_sample'", "type list", "expected a torch.Tensor"),
    ),
    Case(
        "video-pixels-list",
        edit(qwen_batch, pixel_values_videos=lambda b: b["pixel_values_videos"].tolist()),
        ("'pixel_values_videos'", "type list", "expected a torch.Tensor"),
    ),
    Case(
        "zero-dim-pixel-values",
        edit(qwen_batch, pixel_values=torch.tensor(1.0)),
        ("'pixel_values'", "shape ()", "expected at least one dimension"),
    ),
    Case(
        "num-patches-wrong-length",
        edit(step3_batch, num_patches=torch.tensor([0, 2, 1, 1, 0])),
        ("'num_patches'", "shape (5,)", "expected dim 0 of size 4"),
    ),
    Case(
        "num-patches-wrong-sum",
        edit(step3_batch, num_patches=torch.tensor([0, 2, 2, 1])),
        ("'patch_pixel_values'", "shape (4, 3, 2, 2)", "expected dim 0 of size 5", "'num_patches'"),
    ),
    Case(
        "newline-mask-wrong-rows",
        edit(step3_batch, patch_newline_mask=lambda b: b["patch_newline_mask"][:3]),
        ("'patch_newline_mask'", "shape (3,)", "expected dim 0 of size 4", "'num_patches'"),
    ),
    Case(
        "num-patches-negative",
        edit(step3_batch, num_patches=torch.tensor([0, 3, -1, 2])),
        ("'num_patches'", "shape (4,)", "expected non-negative"),
    ),
    Case(
        "num-patches-float",
        edit(step3_batch, num_patches=torch.tensor([0.0, 2.0, 1.0, 1.0])),
        ("'num_patches'", "shape (4,), dtype torch.float32", "expected a 1-D integer tensor"),
    ),
    Case(
        "num-patches-list",
        edit(step3_batch, num_patches=[0, 2, 1, 1]),
        ("'num_patches'", "type list", "expected a torch.Tensor"),
    ),
    Case(
        "crops-with-an-image-grid",
        edit(qwen_batch, num_patches=torch.zeros(4, dtype=torch.int64)),
        ("'num_patches'", "shape (4,)", "expected to come with 'pixel_values' and no image grid"),
    ),
    Case(
        "full-images-wrong-rows",
        edit(
            plain_batch,
            pixel_values=_more_rows(1),
        ),
        (
            "'pixel_values'",
            "shape (5, 3, 2, 2)",
            re.compile(r"expected (dim 0 of size 4|4 rows) \(one (image|item) per sample\)"),
        ),
    ),
    Case(
        "batch-smaller-than-microbatches",
        qwen_batch,
        ("batch_size 4 is smaller than n_microbatches 5",),
        n_microbatches=5,
    ),
    Case(
        "zero-microbatches", qwen_batch, ("n_microbatches must be >= 1, got 0",), n_microbatches=0
    ),
    Case(
        "negative-microbatches",
        qwen_batch,
        ("n_microbatches must be >= 1, got -2",),
        n_microbatches=-2,
    ),
    Case(
        "already-prepared",
        edit(qwen_batch, **{VLM_PP_MEDIA_KEY: {"pixel_values": [torch.zeros(0, 4)] * 2}}),
        (f"already carries '{VLM_PP_MEDIA_KEY}'",),
    ),
]


def _pattern(parts: tuple[str | re.Pattern[str], ...]) -> str:
    """The parts in order; strings match literally, compiled patterns as regular expressions."""
    return ".*".join(p.pattern if isinstance(p, re.Pattern) else re.escape(p) for p in parts)


def _snapshot(batch: dict[str, Any]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Key order, the value objects, and clones of the tensor values."""
    clones = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return list(batch), dict(batch), clones


def _assert_untouched(
    batch: dict[str, Any], snapshot: tuple[list[str], dict[str, Any], dict[str, Any]]
) -> None:
    keys, objects, clones = snapshot
    assert list(batch) == keys
    for key in keys:
        assert batch[key] is objects[key], key
    for key, clone in clones.items():
        assert torch.equal(batch[key], clone), key


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_prepare_rejects_and_keeps_the_batch(case: Case) -> None:
    """The message names field, shape and expectation; the batch is exactly as before."""
    batch = case.build()
    snapshot = _snapshot(batch)
    with pytest.raises(ValueError, match=_pattern(case.parts)):
        prepare_vlm_media_for_pp(batch, case.batch_size, case.n_microbatches)
    _assert_untouched(batch, snapshot)


def test_cases_are_valid_before_the_edit() -> None:
    """The unedited batches prepare without error (so each case fails for its own edit)."""
    for build in (qwen_batch, step3_batch, plain_batch, per_image_batch):
        prepare_vlm_media_for_pp(build(), B, 2)


def test_wrap_rejects_and_keeps_the_batch() -> None:
    """No ``input_ids`` in a batch with media: a clear error, the collated batch untouched."""
    batch = edit(qwen_batch, input_ids=None)()
    snapshot = _snapshot(batch)
    collate = wrap_vlm_collate_for_pp(lambda samples: batch, 2)
    with pytest.raises(ValueError, match=_pattern(("no 'input_ids' tensor", "batch_size_key="))):
        collate([0, 1, 2, 3])
    _assert_untouched(batch, snapshot)


def test_wrap_rejects_bad_input_ids() -> None:
    """``input_ids`` that is not a ``[B, ...]`` tensor cannot give the batch size."""
    batch = edit(qwen_batch, input_ids=torch.tensor(3))()
    with pytest.raises(ValueError, match=re.escape("no 'input_ids' tensor")):
        wrap_vlm_collate_for_pp(lambda samples: batch, 2)([0])


@pytest.mark.parametrize("n_microbatches", [0, -1])
def test_wrap_rejects_bad_microbatch_count_up_front(n_microbatches: int) -> None:
    """The wrapper checks ``n_microbatches`` when it is made, not at the first batch."""
    with pytest.raises(ValueError, match=re.escape(f"must be >= 1, got {n_microbatches}")):
        wrap_vlm_collate_for_pp(qwen_batch, n_microbatches)


def test_wrap_batch_smaller_than_microbatches() -> None:
    """B < M found by the wrapper: the engine's constraint is named."""
    batch = qwen_batch()
    snapshot = _snapshot(batch)
    with pytest.raises(
        ValueError, match=re.escape("batch_size 4 is smaller than n_microbatches 8")
    ):
        wrap_vlm_collate_for_pp(lambda samples: batch, 8)([0])
    _assert_untouched(batch, snapshot)


# --- the chunk functions raise the same errors -------------------------------------------

FLAT_PIXELS = qwen_batch()["pixel_values"]
FLAT_GRID = qwen_batch()["image_grid_thw"]
FLAT_COUNTS = qwen_batch()["n_images_per_sample"]

CHUNK_VLM_CASES: list[tuple[str, tuple[Any, ...], tuple[str, ...]]] = [
    (
        "patches-do-not-match-grid",
        (FLAT_PIXELS[:8], FLAT_GRID, B, 2, FLAT_COUNTS),
        ("'pixel_values'", "shape (8, 4)", "expected dim 0 of size 9"),
    ),
    (
        "counts-sum",
        (FLAT_PIXELS, FLAT_GRID, B, 2, torch.tensor([1, 2, 1, 1])),
        ("'n_images_per_sample'", "shape (4,)", "expected counts that sum to 4"),
    ),
    (
        "counts-length",
        (FLAT_PIXELS, FLAT_GRID, B, 2, FLAT_COUNTS[:3]),
        ("'n_images_per_sample'", "shape (3,)", "expected dim 0 of size 4"),
    ),
    (
        "counts-negative",
        (FLAT_PIXELS, FLAT_GRID, B, 2, torch.tensor([2, 2, -1, 1])),
        ("'n_images_per_sample'", "shape (4,)", "expected non-negative"),
    ),
    (
        "float-grid",
        (FLAT_PIXELS, FLAT_GRID.double(), B, 2, FLAT_COUNTS),
        ("'image_grid'", "dtype torch.float64", "expected a 2-D integer tensor"),
    ),
    (
        "one-dimensional-grid",
        (FLAT_PIXELS, FLAT_GRID[0], B, 2, FLAT_COUNTS),
        ("'image_grid'", "shape (3,)", "expected a 2-D integer tensor"),
    ),
    (
        "pixel-values-list",
        ([[0.0] * 4] * 9, FLAT_GRID, B, 2, FLAT_COUNTS),
        ("'pixel_values'", "type list", "expected a torch.Tensor"),
    ),
    (
        "grid-missing",
        (FLAT_PIXELS, None, B, 2, FLAT_COUNTS),
        ("'image_grid'", "type NoneType", "expected a torch.Tensor"),
    ),
    (
        "grid-rows-are-not-samples-without-counts",
        (FLAT_PIXELS, FLAT_GRID, 5, 2, None),
        ("'image_grid'", "shape (4, 3)", "expected 5 rows (one item per sample)"),
    ),
    (
        "batch-smaller-than-microbatches",
        (FLAT_PIXELS, FLAT_GRID, B, 5, FLAT_COUNTS),
        ("batch_size 4 is smaller than n_microbatches 5",),
    ),
    (
        "zero-microbatches",
        (FLAT_PIXELS, FLAT_GRID, B, 0, FLAT_COUNTS),
        ("n_microbatches must be >= 1, got 0",),
    ),
]


@pytest.mark.parametrize(
    ("args", "parts"), [c[1:] for c in CHUNK_VLM_CASES], ids=[c[0] for c in CHUNK_VLM_CASES]
)
def test_chunk_vlm_media_rejects(args: tuple[Any, ...], parts: tuple[str, ...]) -> None:
    """``chunk_vlm_media`` names its own parameters (``image_grid``) in the message."""
    with pytest.raises(ValueError, match=_pattern(parts)):
        chunk_vlm_media(*args)


STEP3 = step3_batch()
STEP3_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "num-patches-wrong-length",
        {"num_patches": torch.tensor([1, 1, 1])},
        ("'num_patches'", "shape (3,)", "expected dim 0 of size 4"),
    ),
    (
        "num-patches-wrong-sum",
        {"num_patches": torch.tensor([1, 1, 1, 0])},
        ("'patch_pixel_values'", "shape (4, 3, 2, 2)", "expected dim 0 of size 3"),
    ),
    (
        "flat-pixels-wrong-sum",
        {"pixel_values": STEP3["patch_pixel_values"][:3]},
        ("'pixel_values'", "shape (3, 3, 2, 2)", "or 4 (the sum of 'num_patches'"),
    ),
    (
        "crops-list",
        {"patch_pixel_values": [1, 2, 3, 4]},
        ("'patch_pixel_values'", "type list", "expected a torch.Tensor"),
    ),
    (
        "mask-zero-dim",
        {"patch_newline_mask": torch.tensor(True)},
        ("'patch_newline_mask'", "shape ()", "expected at least one dimension"),
    ),
    ("too-many-microbatches", {"n_microbatches": 9}, ("smaller than n_microbatches 9",)),
]


@pytest.mark.parametrize(
    ("changes", "parts"), [c[1:] for c in STEP3_CASES], ids=[c[0] for c in STEP3_CASES]
)
def test_chunk_step3_media_rejects(changes: dict[str, Any], parts: tuple[str, ...]) -> None:
    """``chunk_step3_media`` with one bad argument."""
    kwargs: dict[str, Any] = {
        "pixel_values": STEP3["pixel_values"],
        "batch_size": B,
        "n_microbatches": 2,
        "num_patches": STEP3["num_patches"],
        "patch_pixel_values": STEP3["patch_pixel_values"],
        "patch_newline_mask": STEP3["patch_newline_mask"],
    }
    kwargs.update(changes)
    with pytest.raises(ValueError, match=_pattern(parts)):
        chunk_step3_media(**kwargs)
