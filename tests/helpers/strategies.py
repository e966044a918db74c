"""Hypothesis strategies: small specs of VLM batches, built into tensors by ``build_batch``.

A spec holds only numbers and flags, so a failing example prints readably; ``build_batch``
turns it into a ``MediaBatch`` with owner-encoded media (see ``media_batches``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from pp_media import ONE_ROW, CountRows, GridRows, MediaGroup, MediaLayout
from tests.helpers import media_batches as mb

#: Image layouts of a collated batch ("none": no images, videos only).
IMAGE_LAYOUTS: tuple[str, ...] = (
    "none",
    "qwen",  # flat [patches, D] + image_grid_thw + n_images_per_sample
    "qwen_legacy",  # flat patches, one image per sample, no counts
    "kimi",  # flat [patches, 3, 2] + image_grid_hws
    "gemma",  # [n_images, P, 3] + image_position_ids [n, P]
    "gemma_2d",  # [n_images, P, 3] + image_position_ids [n, P, 2]
    "gemma_per_sample",  # [B, P, 3] + image_position_ids [B, P], no counts
    "llava_next",  # [n_images, crops, C, H, W] + image_sizes
    "images_4d",  # [B, C, H, W] + image_sizes [B, 2], no counts
    "per_image_counts",  # [n_images, C, H, W] + n_images_per_sample, no grid
    "plain",  # [B, C, H, W] and no metadata at all
    "step3",  # [B, C, H, W] + num_patches + patch_pixel_values + patch_newline_mask
    "step3_flat",  # flat [sum(num_patches), ...] + num_patches (+ crops / mask)
)

#: Layouts that ``chunk_vlm_media`` takes (a pixel tensor and one grid).
GRID_LAYOUTS: tuple[str, ...] = (
    "qwen",
    "qwen_legacy",
    "kimi",
    "gemma",
    "gemma_2d",
    "gemma_per_sample",
    "llava_next",
    "images_4d",
)

GRID_KEY = {
    "qwen": "image_grid_thw",
    "qwen_legacy": "image_grid_thw",
    "kimi": "image_grid_hws",
    "gemma": "image_position_ids",
    "gemma_2d": "image_position_ids",
    "gemma_per_sample": "image_position_ids",
    "llava_next": "image_sizes",
    "images_4d": "image_sizes",
}


@dataclass(frozen=True)
class BatchSpec:
    """Everything random about one batch; ``build_batch`` makes the tensors."""

    layout: str
    batch_size: int
    n_microbatches: int
    #: Images per sample (grid layouts) or crops per sample (``num_patches``, Step3 layouts).
    counts: tuple[int, ...]
    #: One grid row per image of the flat layouts ([t, h, w] or [h, w]).
    grids: tuple[tuple[int, ...], ...]
    #: Videos per sample, or None for a batch without videos.
    video_counts: tuple[int, ...] | None
    video_grids: tuple[tuple[int, ...], ...]
    #: Step3 optional fields: (num_patches, patch_pixel_values, patch_newline_mask).
    step3_fields: tuple[bool, bool, bool] = (True, True, True)
    #: Patches per image of the padded (Gemma) layouts.
    n_patches: int = 3


def _counts(draw: st.DrawFn, batch_size: int, max_count: int) -> list[int]:
    """Per-sample counts, often with a run of text-only samples at the start."""
    counts = draw(st.lists(st.integers(0, max_count), min_size=batch_size, max_size=batch_size))
    leading = draw(st.one_of(st.just(0), st.integers(0, batch_size)))
    return [0] * leading + counts[leading:]


def _grids(draw: st.DrawFn, n: int, width: int) -> tuple[tuple[int, ...], ...]:
    row = (
        st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))
        if width == 3
        else st.tuples(st.integers(1, 4), st.integers(1, 4))
    )
    return tuple(draw(st.lists(row, min_size=n, max_size=n)))


@st.composite
def batch_specs(
    draw: st.DrawFn,
    layouts: tuple[str, ...] = IMAGE_LAYOUTS,
    videos: bool | None = None,
    max_batch: int = 40,
    max_microbatches: int = 12,
) -> BatchSpec:
    """Specs with B in [M, max_batch], M in [1, max_microbatches], 0..3 images per sample.

    ``videos``: True / False forces videos in or out; None draws it.
    """
    n_microbatches = draw(st.integers(1, max_microbatches))
    batch_size = draw(st.integers(n_microbatches, max(n_microbatches, max_batch)))
    layout = draw(st.sampled_from(layouts))
    with_videos = draw(st.booleans()) if videos is None else videos
    with_videos = with_videos or layout == "none"

    counts: list[int] = []
    grids: tuple[tuple[int, ...], ...] = ()
    step3_fields = (True, True, True)
    n_patches = draw(st.integers(1, 4))
    if layout in ("qwen", "kimi", "gemma", "gemma_2d", "llava_next", "per_image_counts"):
        counts = _counts(draw, batch_size, 3)
        if layout in ("qwen", "kimi"):
            grids = _grids(draw, sum(counts), 3 if layout == "qwen" else 2)
    elif layout == "qwen_legacy":
        counts = [1] * batch_size
        grids = _grids(draw, batch_size, 3)
    elif layout in ("step3", "step3_flat"):
        counts = _counts(draw, batch_size, 3)
        with_num_patches = layout == "step3_flat" or draw(st.booleans())
        step3_fields = (
            with_num_patches,
            with_num_patches and draw(st.booleans()),
            with_num_patches and draw(st.booleans()),
        )
        if layout == "step3_flat" and sum(counts) == batch_size:
            # A flat tensor with exactly B rows reads as one image per sample; keep them apart.
            counts[-1] += 1
        if not with_num_patches:
            counts = [0] * batch_size

    video_counts: tuple[int, ...] | None = None
    video_grids: tuple[tuple[int, ...], ...] = ()
    if with_videos:
        video_counts = tuple(_counts(draw, batch_size, 2))
        video_grids = _grids(draw, sum(video_counts), 3)
    return BatchSpec(
        layout=layout,
        batch_size=batch_size,
        n_microbatches=n_microbatches,
        counts=tuple(counts),
        grids=grids,
        video_counts=video_counts,
        video_grids=video_grids,
        step3_fields=step3_fields,
        n_patches=n_patches,
    )


def image_group(spec: BatchSpec) -> mb.Group | None:
    """The image fields of ``spec`` (None for the "none" layout)."""
    b, counts, layout = spec.batch_size, spec.counts, spec.layout
    if layout == "none":
        return None
    if layout == "qwen":
        return mb.qwen_images(counts, spec.grids)
    if layout == "qwen_legacy":
        return mb.qwen_legacy_images(spec.grids)
    if layout == "kimi":
        return mb.kimi_images(counts, spec.grids)
    if layout in ("gemma", "gemma_2d"):
        return mb.gemma_images(counts, spec.n_patches, two_d=layout == "gemma_2d")
    if layout == "gemma_per_sample":
        return mb.gemma_per_sample_images(b, spec.n_patches)
    if layout == "llava_next":
        return mb.llava_next_images(counts)
    if layout == "images_4d":
        return mb.images_4d_per_sample(b)
    if layout == "per_image_counts":
        return mb.per_image_counted_images(counts)
    if layout == "plain":
        return mb.plain_images(b)
    if layout in ("step3", "step3_flat"):
        with_num_patches, with_crops, with_mask = spec.step3_fields
        return mb.step3_images(
            counts,
            flat_pixels=layout == "step3_flat",
            include_num_patches=with_num_patches,
            include_crops=with_crops,
            include_mask=with_mask,
        )
    raise AssertionError(f"unknown layout {layout!r}")


def build_batch(spec: BatchSpec) -> mb.MediaBatch:
    """The collated batch of ``spec``: text fields, its images, and its videos."""
    groups: list[mb.Group] = []
    images = image_group(spec)
    if images is not None:
        groups.append(images)
    if spec.video_counts is not None:
        groups.append(mb.qwen_videos(spec.video_counts, spec.video_grids))
    return mb.combine(spec.batch_size, *groups)


def example_spec(layout: str, n_microbatches: int = 2, videos: bool = True) -> BatchSpec:
    """A fixed 5-sample spec of ``layout`` (text-only samples included), with or without videos."""
    grids = {
        "qwen": ((1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 1, 1)),
        "qwen_legacy": tuple((1, 1, 1 + i) for i in range(5)),
        "kimi": ((1, 2), (2, 1), (1, 1), (2, 2)),
    }.get(layout, ())
    counts = (0, 1, 2, 0, 1) if layout != "step3_flat" else (0, 1, 2, 0, 3)
    return BatchSpec(
        layout=layout,
        batch_size=5,
        n_microbatches=n_microbatches,
        counts=counts,
        grids=grids,
        video_counts=(1, 0, 0, 1, 0) if videos or layout == "none" else None,
        video_grids=((1, 1, 1), (1, 1, 2)),
    )


# --- layouts described as data ---------------------------------------------------------------


@dataclass
class LayoutCase:
    """A random ``MediaLayout`` and a batch of it: every field's rows per sample, so that the
    expected chunk of any microbatch is the concatenation of its samples' rows."""

    layout: MediaLayout
    batch_size: int
    n_microbatches: int
    #: Field name -> one tensor per sample (its rows of that field, in batch order).
    rows: dict[str, list[torch.Tensor]]

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        """A fresh batch dict (new dict, new tensors): ``input_ids[:, 0]`` is the sample."""
        batch = {"input_ids": torch.arange(self.batch_size).view(-1, 1).repeat(1, 3)}
        batch.update({name: torch.cat(per_sample) for name, per_sample in self.rows.items()})
        return batch

    def expected(self, name: str, samples: list[int]) -> torch.Tensor:
        return torch.cat([self.rows[name][s] for s in samples])


@st.composite
def layout_cases(draw: st.DrawFn, max_batch: int = 24, max_microbatches: int = 8) -> LayoutCase:
    """1-2 groups with random field names: items counted or one per sample (or none, beside one
    pixel row per sample), rows per item from a grid product, a count or one, and per-item,
    per-sample, per-pixel-row and extra fields; the values of every row name its sample."""
    m = draw(st.integers(1, max_microbatches))
    b = draw(st.integers(m, max(m, max_batch)))
    groups = []
    rows: dict[str, list[torch.Tensor]] = {}
    for g in range(draw(st.integers(1, 2))):
        name = f"g{g}"
        per_sample_pixels = draw(st.booleans())
        rows_kind = "one" if per_sample_pixels else draw(st.sampled_from(["grid", "count", "one"]))
        counted = draw(st.booleans()) or (per_sample_pixels and draw(st.booleans()))
        if counted:
            counts = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
        else:
            counts = [0 if per_sample_pixels else 1] * b
        width = draw(st.integers(1, 3))
        item_rows = [
            [
                draw(st.lists(st.integers(1, 2), min_size=width, max_size=width))
                if rows_kind == "grid"
                else draw(st.integers(1, 3))
                if rows_kind == "count"
                else 1
                for _ in range(n)
            ]
            for n in counts
        ]
        per_item = tuple(f"{name}_item{i}" for i in range(draw(st.integers(0, 2))))
        per_sample = tuple(f"{name}_sample{i}" for i in range(draw(st.integers(0, 1))))
        extras = tuple(f"{name}_extra{i}" for i in range(draw(st.integers(0, 1))))
        per_row = tuple(f"{name}_row{i}" for i in range(draw(st.integers(0, 1))))
        group_rows = (
            GridRows((f"{name}_grid",))
            if rows_kind == "grid"
            else CountRows(f"{name}_rows")
            if rows_kind == "count"
            else ONE_ROW
        )
        groups.append(
            MediaGroup(
                f"{name}_pixels",
                items=f"{name}_counts" if counted or draw(st.booleans()) else None,
                missing_items=0 if per_sample_pixels else 1,
                rows=group_rows,
                pixels_per_sample=per_sample_pixels,
                per_item=per_item,
                item_pixels=per_item[:1],
                per_sample=per_sample,
                per_row=per_row,
                extras=extras,
            )
        )
        for s in range(b):
            n = counts[s]
            if per_sample_pixels:
                pixels = 1
            elif rows_kind == "grid":
                pixels = sum(math.prod(grid) for grid in item_rows[s])
            elif rows_kind == "count":
                pixels = sum(item_rows[s])
            else:
                pixels = n
            owner = float(s)
            rows.setdefault(f"{name}_pixels", []).append(torch.full((pixels, 2), owner))
            for field in per_row:  # Gemma4's video_position_ids: [pixel rows, P, 2]
                rows.setdefault(field, []).append(torch.full((pixels, 3, 2), s))
            if counted:
                rows.setdefault(f"{name}_counts", []).append(torch.tensor([n]))
            if rows_kind == "grid":
                grid = torch.tensor(item_rows[s], dtype=torch.int64).view(n, width)
                rows.setdefault(f"{name}_grid", []).append(grid)
            if rows_kind == "count":
                rows.setdefault(f"{name}_rows", []).append(torch.tensor(item_rows[s]).long())
            for field in (*per_item, *extras):
                rows.setdefault(field, []).append(torch.full((n, 1), s, dtype=torch.int32))
            for field in per_sample:
                rows.setdefault(field, []).append(torch.full((1, 3), owner))
    return LayoutCase(MediaLayout(tuple(groups)), b, m, rows)
