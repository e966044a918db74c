"""The seed's chunking functions: one media layout in, one list of views per microbatch out."""

from __future__ import annotations

import torch

from pp_media._core.errors import check_microbatches
from pp_media._core.host_read import DeferredHostRead
from pp_media._core.row_maps import (
    MediaGroup,
    plan_media_group,
    plan_patch_mapped,
    split_flat_counted,
)


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
    group = MediaGroup(
        "pixel_values",
        pixel_values,
        grid_name,
        image_grid,
        "n_images_per_sample",
        n_images_per_sample,
    )
    reader = DeferredHostRead()
    finish = plan_media_group(group, batch_size, n_microbatches, reader)
    chunks = finish(reader.read())
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
    reader = DeferredHostRead()
    finish = plan_patch_mapped(
        pixel_values,
        batch_size,
        n_microbatches,
        reader,
        num_patches=num_patches,
        patch_pixel_values=patch_pixel_values,
        patch_newline_mask=patch_newline_mask,
    )
    return finish(reader.read())
