"""The seed's chunking functions: one media layout in, one list of views per microbatch out."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from pp_media._core.bounds import sample_row_counts
from pp_media._core.errors import check_microbatches, require_tensor
from pp_media._core.host_read import DeferredHostRead
from pp_media._core.reading import read_media
from pp_media._core.row_maps import Chunks, plan_media_group, split_flat_counted, split_rows
from pp_media._layouts import GRID_IMAGES, STEP3_IMAGES, GridRows, MediaLayout

#: ``chunk_step3_media``'s layout: the Step3 group whatever fields are given.
_STEP3_LAYOUT = MediaLayout((dataclasses.replace(STEP3_IMAGES, when=()),))


@functools.lru_cache(maxsize=32)
def _grid_layout(grid_name: str) -> MediaLayout:
    """``chunk_vlm_media``'s layout: images mapped by one grid named ``grid_name``."""
    group = dataclasses.replace(GRID_IMAGES, rows=GridRows((grid_name,)), extras=(), when=())
    return MediaLayout((group,))


def _split(
    present: dict[str, Any], batch_size: int, n_microbatches: int, layout: MediaLayout
) -> Chunks:
    """The one group of ``layout`` read, planned and split (one host read)."""
    (reading,) = read_media(present, batch_size, layout).groups
    reader = DeferredHostRead()
    finish = plan_media_group(reading, n_microbatches, reader)
    return finish(reader.read())


def _select_image_grid(
    image_grid_hws: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    image_sizes: torch.Tensor | None,
    image_position_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """The per-image metadata that maps images to rows: hws, then thw, then sizes, then ids."""
    for grid in (image_grid_hws, image_grid_thw, image_sizes, image_position_ids):
        if grid is not None:
            return grid
    return None


def chunk_vlm_media(
    pixel_values: torch.Tensor,
    image_grid: torch.Tensor,
    batch_size: int,
    n_microbatches: int,
    n_images_per_sample: torch.Tensor | None = None,
    *,
    grid_name: str = "image_grid",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split VLM pixel values and their grid into the engine's ``n_microbatches`` chunks.

    Layouts (dim 0 of ``pixel_values``):

    1. ``[B, C, H, W]``: one full image per sample.
    2. ``[B, max_patches, D]``: padded patches, one image per sample.
    3. Flat patches ``[total_patches, ...]`` with ``n_images_per_sample`` ([B] counts); image i
       has ``prod(image_grid[i])`` patches. Per-image tensors (dim 0 == images) work too.
    4. Flat patches with one image per sample (``image_grid`` has B rows).

    Returns ``(pixel_values_chunks, image_grid_chunks)``, each exactly ``n_microbatches`` views;
    microbatch k holds the media of the samples that the engine puts into microbatch k.
    ``grid_name`` only names the grid in error messages.
    """
    check_microbatches(batch_size, n_microbatches)
    if n_images_per_sample is not None:
        fast = split_flat_counted(
            pixel_values, image_grid, n_images_per_sample, batch_size, n_microbatches
        )
        if fast is not None:
            return fast[0], fast[1]
    present = {"pixel_values": pixel_values, grid_name: require_tensor(grid_name, image_grid)}
    if n_images_per_sample is not None:
        present["n_images_per_sample"] = n_images_per_sample
    chunks = _split(present, batch_size, n_microbatches, _grid_layout(grid_name))
    return chunks["pixel_values"], chunks[grid_name]


def chunk_step3_media(
    pixel_values: torch.Tensor,
    batch_size: int,
    n_microbatches: int,
    num_patches: torch.Tensor | None = None,
    patch_pixel_values: torch.Tensor | None = None,
    patch_newline_mask: torch.Tensor | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Split Step3-style media: one full image per sample plus crops mapped by ``num_patches``.

    ``pixel_values`` is ``[B, ...]`` or a flat ``[sum(num_patches), ...]`` tensor;
    ``patch_pixel_values`` and ``patch_newline_mask`` have ``sum(num_patches)`` rows;
    ``num_patches`` ([B] crops per sample) defaults to zeros. A ``pixel_values`` with exactly B
    rows is read as one image per sample, even if ``sum(num_patches)`` is B too. Returns a dict with
    ``pixel_values`` and ``num_patches`` (and the optional fields given), each a list of
    ``n_microbatches`` views.
    """
    check_microbatches(batch_size, n_microbatches)
    present = {"pixel_values": pixel_values}
    for name, value in (
        ("num_patches", num_patches),
        ("patch_pixel_values", patch_pixel_values),
        ("patch_newline_mask", patch_newline_mask),
    ):
        if value is not None:
            present[name] = value
    chunks = _split(present, batch_size, n_microbatches, _STEP3_LAYOUT)
    if num_patches is None:
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=pixel_values.device)
        chunks["num_patches"] = split_rows(zeros, sample_row_counts(batch_size, n_microbatches))
    order = ("pixel_values", "num_patches", "patch_pixel_values", "patch_newline_mask")
    return {name: chunks[name] for name in order if name in chunks}
