"""Synthetic collated VLM batches whose media values name the sample that owns them.

Every media row built here is filled so that its flattened values start with
``(sample id, item index within the sample, row index within the item)``; ``input_ids[i, 0]``
is ``i``. A microbatch's media can then be compared, value for value, with the rows owned by
the samples that ``torch.distributed.pipelining`` puts into that microbatch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

SEQ_LEN = 5

#: (fields as collated, per-sample rows of each field)
Group = tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]


def owner_rows(
    rows: int,
    trailing: Sequence[int],
    sample: int,
    item: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``rows`` media rows of shape ``trailing``; each row's flat values start (sample, item, r)."""
    width = math.prod(trailing)
    if width < 3:
        raise AssertionError(f"trailing shape {tuple(trailing)} is too small to name an owner")
    out = torch.full((rows, width), -1, dtype=dtype)
    out[:, 0] = sample
    out[:, 1] = item
    out[:, 2] = torch.arange(rows, dtype=dtype)
    return out.reshape(rows, *trailing)


def text_fields(batch_size: int, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """``input_ids`` (sample id in column 0), ``attention_mask`` and ``labels`` for a batch."""
    input_ids = torch.arange(batch_size * seq_len, dtype=torch.int64).reshape(batch_size, seq_len)
    input_ids = input_ids + 1000
    input_ids[:, 0] = torch.arange(batch_size)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.int64),
        "labels": input_ids.clone(),
    }


@dataclass
class MediaBatch:
    """A collated batch plus, for every media field, the rows each sample owns."""

    batch: dict[str, Any]
    per_sample: dict[str, list[torch.Tensor]]
    #: Shallow copy of ``batch`` taken at construction (the very same tensor objects).
    originals: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.originals = dict(self.batch)

    @property
    def batch_size(self) -> int:
        """Number of samples (dim 0 of ``input_ids``)."""
        return int(self.originals["input_ids"].shape[0])

    def expected(self, name: str, samples: Sequence[int]) -> torch.Tensor:
        """The rows of field ``name`` owned by ``samples``, concatenated in that order."""
        return torch.cat([self.per_sample[name][i] for i in samples])


def combine(batch_size: int, *groups: Group) -> MediaBatch:
    """A ``MediaBatch`` with the text fields of ``batch_size`` samples and the given media."""
    batch: dict[str, Any] = dict(text_fields(batch_size))
    per_sample: dict[str, list[torch.Tensor]] = {}
    for fields, rows in groups:
        batch.update(fields)
        per_sample.update(rows)
    for name, rows in per_sample.items():
        if len(rows) != batch_size:
            raise AssertionError(f"{name}: {len(rows)} samples' rows for a batch of {batch_size}")
    return MediaBatch(batch, per_sample)


def grid_group(
    counts: Sequence[int],
    grids: Sequence[Any],
    *,
    grid_key: str,
    grid_shape: Sequence[int],
    pixels_key: str = "pixel_values",
    counts_key: str = "n_images_per_sample",
    patch_shape: Sequence[int] = (4,),
    per_item_shape: Sequence[int] | None = None,
    include_counts: bool = True,
) -> Group:
    """Grid-described media: ``counts[i]`` items of sample i, item g described by ``grids[g]``.

    Flat layout (``per_item_shape`` None): item g has ``prod(grids[g])`` rows of
    ``patch_shape``. Per-item layout: one row of ``per_item_shape`` per item.
    """
    if sum(counts) != len(grids):
        raise AssertionError(f"counts {list(counts)} do not match {len(grids)} grid rows")
    grid = torch.tensor(list(grids), dtype=torch.int64).reshape(len(grids), *grid_shape)
    trailing = tuple(patch_shape if per_item_shape is None else per_item_shape)
    pixels_rows: list[torch.Tensor] = []
    grid_rows: list[torch.Tensor] = []
    start = 0
    for sample, n in enumerate(counts):
        parts = []
        for item in range(n):
            rows = 1 if per_item_shape is not None else math.prod(grids[start + item])
            parts.append(owner_rows(rows, trailing, sample, item))
        pixels_rows.append(torch.cat(parts) if parts else torch.empty(0, *trailing))
        grid_rows.append(grid[start : start + n].clone())
        start += n
    fields = {pixels_key: torch.cat(pixels_rows), grid_key: grid}
    per_sample = {pixels_key: pixels_rows, grid_key: grid_rows}
    if include_counts:
        fields[counts_key] = torch.tensor(list(counts), dtype=torch.int64)
        per_sample[counts_key] = [torch.tensor([n], dtype=torch.int64) for n in counts]
    return fields, per_sample


def qwen_images(counts: Sequence[int], grids: Sequence[Sequence[int]]) -> Group:
    """Qwen2-VL style: flat ``pixel_values [patches, 4]``, ``image_grid_thw``, counts."""
    return grid_group(counts, grids, grid_key="image_grid_thw", grid_shape=(3,))


def qwen_legacy_images(grids: Sequence[Sequence[int]]) -> Group:
    """Flat patches with exactly one image per sample and no ``n_images_per_sample``."""
    return grid_group(
        [1] * len(grids), grids, grid_key="image_grid_thw", grid_shape=(3,), include_counts=False
    )


def qwen_videos(counts: Sequence[int], grids: Sequence[Sequence[int]]) -> Group:
    """Qwen2-VL style videos: flat ``pixel_values_videos``, ``video_grid_thw``, counts."""
    return grid_group(
        counts,
        grids,
        grid_key="video_grid_thw",
        grid_shape=(3,),
        pixels_key="pixel_values_videos",
        counts_key="n_videos_per_sample",
        patch_shape=(2, 3),
    )


def kimi_images(counts: Sequence[int], grids: Sequence[Sequence[int]]) -> Group:
    """Kimi-VL style: flat ``pixel_values [patches, 3, 2]`` with ``image_grid_hws [n, 2]``."""
    return grid_group(counts, grids, grid_key="image_grid_hws", grid_shape=(2,), patch_shape=(3, 2))


def _position_ids(n_images: int, n_patches: int, two_d: bool) -> list[Any]:
    """Per-image position ids that differ between images: ``[P]`` or ``[P, 2]`` per image."""
    if two_d:
        return [[[g, p] for p in range(n_patches)] for g in range(n_images)]
    return [[10 * g + p for p in range(n_patches)] for g in range(n_images)]


def gemma_images(counts: Sequence[int], n_patches: int = 3, two_d: bool = False) -> Group:
    """Gemma style: padded ``pixel_values [n_images, P, 3]`` with ``image_position_ids``."""
    return grid_group(
        counts,
        _position_ids(sum(counts), n_patches, two_d),
        grid_key="image_position_ids",
        grid_shape=(n_patches, 2) if two_d else (n_patches,),
        per_item_shape=(n_patches, 3),
    )


def gemma_per_sample_images(batch_size: int, n_patches: int = 3) -> Group:
    """``pixel_values [B, P, 3]``: padded patches, one image per sample, no counts."""
    return grid_group(
        [1] * batch_size,
        _position_ids(batch_size, n_patches, False),
        grid_key="image_position_ids",
        grid_shape=(n_patches,),
        per_item_shape=(n_patches, 3),
        include_counts=False,
    )


def llava_next_images(counts: Sequence[int]) -> Group:
    """LLaVA-NeXT style: ``pixel_values [n_images, crops, C, H, W]`` with ``image_sizes``."""
    sizes = [[100 + g, 200 + 3 * g] for g in range(sum(counts))]
    return grid_group(
        counts, sizes, grid_key="image_sizes", grid_shape=(2,), per_item_shape=(2, 3, 2, 2)
    )


def images_4d_per_sample(batch_size: int) -> Group:
    """``pixel_values [B, C, H, W]`` with ``image_sizes [B, 2]``: one image per sample."""
    sizes = [[100 + g, 200 + g] for g in range(batch_size)]
    return grid_group(
        [1] * batch_size,
        sizes,
        grid_key="image_sizes",
        grid_shape=(2,),
        per_item_shape=(3, 2, 2),
        include_counts=False,
    )


def per_image_counted_images(counts: Sequence[int]) -> Group:
    """``pixel_values [n_images, 3, 2, 2]`` mapped by ``n_images_per_sample``; no grid."""
    fields, per_sample = grid_group(
        counts,
        [(1, 1)] * sum(counts),
        grid_key="image_sizes",
        grid_shape=(2,),
        per_item_shape=(3, 2, 2),
    )
    del fields["image_sizes"], per_sample["image_sizes"]
    return fields, per_sample


def step3_images(
    num_patches: Sequence[int],
    *,
    flat_pixels: bool = False,
    include_num_patches: bool = True,
    include_crops: bool = True,
    include_mask: bool = True,
) -> Group:
    """Step3 style: ``pixel_values [B, 3, 2, 2]`` (or flat crops) plus crops per ``num_patches``.

    ``patch_pixel_values [sum(num_patches), 3, 2, 2]`` rows are owned as item 1;
    ``patch_newline_mask [sum(num_patches)]`` is a bool pattern that depends on the owner.
    """
    image_shape = (3, 2, 2)
    fields: dict[str, torch.Tensor] = {}
    per_sample: dict[str, list[torch.Tensor]] = {}
    if flat_pixels:
        per_sample["pixel_values"] = [
            owner_rows(n, image_shape, i, 0) for i, n in enumerate(num_patches)
        ]
    else:
        per_sample["pixel_values"] = [
            owner_rows(1, image_shape, i, 0) for i in range(len(num_patches))
        ]
    if include_num_patches:
        per_sample["num_patches"] = [torch.tensor([n], dtype=torch.int64) for n in num_patches]
    if include_crops:
        per_sample["patch_pixel_values"] = [
            owner_rows(n, image_shape, i, 1) for i, n in enumerate(num_patches)
        ]
    if include_mask:
        per_sample["patch_newline_mask"] = [
            torch.tensor([(i + r) % 3 == 0 for r in range(n)], dtype=torch.bool)
            for i, n in enumerate(num_patches)
        ]
    for name, rows in per_sample.items():
        fields[name] = torch.cat(rows)
    return fields, per_sample


def plain_images(batch_size: int) -> Group:
    """LLaVA-1.5 / PaliGemma style: ``pixel_values [B, 3, 2, 2]`` and nothing else."""
    return step3_images(
        [0] * batch_size, include_num_patches=False, include_crops=False, include_mask=False
    )


def engine_sample_chunks(input_ids: torch.Tensor, n_microbatches: int) -> list[list[int]]:
    """Sample ids of each microbatch, as ``torch.distributed.pipelining`` splits ``input_ids``."""
    _, kwargs_chunks = split_args_kwargs_into_chunks((), {"input_ids": input_ids}, n_microbatches)
    return [chunk["input_ids"][:, 0].tolist() for chunk in kwargs_chunks]


def assert_chunks_aligned(
    chunks: Mapping[str, Sequence[torch.Tensor]],
    media: MediaBatch,
    n_microbatches: int,
    *,
    exact_keys: bool = True,
) -> None:
    """Chunk k of every field holds exactly the rows of the engine's microbatch k, in order."""
    samples = engine_sample_chunks(media.originals["input_ids"], n_microbatches)
    assert len(samples) == n_microbatches
    assert [i for ids in samples for i in ids] == list(range(media.batch_size))
    if exact_keys:
        assert set(chunks) == set(media.per_sample)
    else:
        assert set(media.per_sample) <= set(chunks)
    for name in media.per_sample:
        field_chunks = chunks[name]
        assert isinstance(field_chunks, list), f"{name}: {type(field_chunks).__name__}"
        assert len(field_chunks) == n_microbatches, f"{name}: {len(field_chunks)} chunks"
        for k, ids in enumerate(samples):
            got, want = field_chunks[k], media.expected(name, ids)
            assert got.dtype == want.dtype, f"{name}[{k}]: dtype {got.dtype} != {want.dtype}"
            assert got.shape == want.shape, (
                f"{name}[{k}] (samples {ids}): shape {tuple(got.shape)} != {tuple(want.shape)}"
            )
            assert torch.equal(got, want), f"{name}[{k}] (samples {ids}): values differ"
