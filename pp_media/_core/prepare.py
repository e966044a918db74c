"""Collate-side entry points: take the media out of a batch and store them per microbatch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch

from pp_media._core.errors import check_microbatches, check_n_microbatches, media_error
from pp_media._core.host_read import DeferredHostRead
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._core.row_maps import (
    Chunks,
    Finish,
    MediaGroup,
    plan_media_group,
    plan_patch_mapped,
    plan_per_sample,
)
from pp_media._keys import (
    _VLM_MEDIA_KEYS,
    IMAGE_GRID_KEYS,
    IMAGE_ROW_KEYS,
    VIDEO_ROW_KEYS,
    VLM_PP_MEDIA_KEY,
)

_STEP3_KEYS = ("num_patches", "patch_pixel_values", "patch_newline_mask")
_ROW_KEYS = (*IMAGE_ROW_KEYS, *VIDEO_ROW_KEYS)


def _plan_images(
    present: Mapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    reader: DeferredHostRead,
) -> tuple[list[Finish], set[str]]:
    grids = [key for key in IMAGE_GRID_KEYS if key in present]
    step3 = [key for key in _STEP3_KEYS if key in present]
    row_keys = [key for key in IMAGE_ROW_KEYS if key in present]
    if grids or not step3:
        # A grid, or per-image pixel values mapped by n_images_per_sample (or one per sample).
        group = MediaGroup(
            "pixel_values",
            present["pixel_values"],
            grids[0] if grids else None,
            present[grids[0]] if grids else None,
            "n_images_per_sample",
            present.get("n_images_per_sample"),
            extra_rows=tuple((key, present[key]) for key in (*grids[1:], *row_keys)),
        )
        plan = plan_media_group(group, batch_size, n_microbatches, reader)
        return [plan], {"pixel_values", "n_images_per_sample", *grids, *row_keys}
    plans = [
        _only_given(
            plan_patch_mapped(
                present["pixel_values"],
                batch_size,
                n_microbatches,
                reader,
                **{key: present.get(key) for key in _STEP3_KEYS},
            ),
            given={"pixel_values", *step3},
        )
    ]
    if "n_images_per_sample" in present:
        plans.append(
            plan_per_sample(
                "n_images_per_sample", present["n_images_per_sample"], batch_size, n_microbatches
            )
        )
    return plans, {"pixel_values", "n_images_per_sample", *_STEP3_KEYS}


def _only_given(finish: Finish, given: set[str]) -> Finish:
    """Keep only the fields the batch had: stage 0 must not get a ``num_patches`` it never had."""
    return lambda values: {name: chunks for name, chunks in finish(values).items() if name in given}


def _plan_videos(
    present: Mapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    reader: DeferredHostRead,
) -> tuple[list[Finish], set[str]]:
    if "video_grid_thw" not in present:
        raise media_error(
            "pixel_values_videos",
            present["pixel_values_videos"],
            "'video_grid_thw' beside it (one [t, h, w] row per video)",
            "Keep the processor's video_grid_thw in the collated batch.",
        )
    group = MediaGroup(
        "pixel_values_videos",
        present["pixel_values_videos"],
        "video_grid_thw",
        present["video_grid_thw"],
        "n_videos_per_sample",
        present.get("n_videos_per_sample"),
        extra_rows=tuple((key, present[key]) for key in VIDEO_ROW_KEYS if key in present),
    )
    plan = plan_media_group(group, batch_size, n_microbatches, reader)
    return [plan], {"pixel_values_videos", "video_grid_thw", "n_videos_per_sample", *VIDEO_ROW_KEYS}


def _reject_unaligned(present: Mapping[str, Any], consumed: set[str]) -> None:
    if present.keys() <= consumed:
        return
    for key in _VLM_MEDIA_KEYS:
        if key not in present or key in consumed:
            continue
        if key in ("video_grid_thw", "n_videos_per_sample"):
            needs = "'pixel_values_videos'"
        elif key in _STEP3_KEYS:
            needs = "'pixel_values' and no image grid (Step3-style crops)"
        else:
            needs = "'pixel_values'"
        raise media_error(
            key,
            present[key],
            f"to come with {needs}",
            "Without it there is nothing to align this field with; drop it or keep its media.",
        )


def prepare_vlm_media_for_pp(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
) -> MutableMapping[str, Any]:
    """Move the batch's media into ``batch[VLM_PP_MEDIA_KEY]``, pre-split per microbatch.

    The stored value maps each processor field name (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ...) to a list of exactly ``n_microbatches`` views; microbatch k
    holds the media of the samples that ``torch.distributed.pipelining`` puts into microbatch k.
    Everything is validated before the batch is touched: on error the batch is unchanged.
    A batch without media comes back unchanged. Returns ``batch`` (mutated in place).
    """
    check_microbatches(batch_size, n_microbatches)
    present = {key: value for key in _VLM_MEDIA_KEYS if (value := batch.get(key)) is not None}
    if not present:
        return batch
    # Per-item extras travel with their media group; without one they are not ours to touch.
    present.update((key, batch[key]) for key in _ROW_KEYS if batch.get(key) is not None)
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch already carries '{VLM_PP_MEDIA_KEY}' and also raw media "
            f"{sorted(present)}; prepare each batch once."
        )

    reader = DeferredHostRead()
    plans: list[Finish] = []
    consumed: set[str] = set()
    if "pixel_values" in present:
        image_plans, image_keys = _plan_images(present, batch_size, n_microbatches, reader)
        plans += image_plans
        consumed |= image_keys
    if "pixel_values_videos" in present:
        video_plans, video_keys = _plan_videos(present, batch_size, n_microbatches, reader)
        plans += video_plans
        consumed |= video_keys
    _reject_unaligned(present, consumed)

    values = reader.read()
    media: Chunks = {}
    for finish in plans:
        media.update(finish(values))

    for key in (*_VLM_MEDIA_KEYS, *consumed):
        batch.pop(key, None)
    batch[VLM_PP_MEDIA_KEY] = media
    return batch


class _PPCollate:
    """Picklable collate wrapper (DataLoader workers may be spawned, not forked)."""

    def __init__(
        self,
        collate_fn: Callable[[Any], MutableMapping[str, Any]],
        n_microbatches: int,
        batch_size_key: str,
        even_microbatches: bool,
    ) -> None:
        self.collate_fn = collate_fn
        self.n_microbatches = n_microbatches
        self.batch_size_key = batch_size_key
        self.even_microbatches = even_microbatches

    def __call__(self, examples: Any) -> Any:
        batch = self.collate_fn(examples)
        if not isinstance(batch, MutableMapping):
            return batch
        has_media = any(batch.get(key) is not None for key in _VLM_MEDIA_KEYS)
        if not (has_media or self.even_microbatches):
            return batch
        batch_size = self._batch_size(batch)
        if has_media:
            prepare_vlm_media_for_pp(batch, batch_size, self.n_microbatches)
        if self.even_microbatches:
            pad_to_even_microbatches(batch, batch_size, self.n_microbatches)
        return batch

    def _batch_size(self, batch: Mapping[str, Any]) -> int:
        reference = batch.get(self.batch_size_key)
        if not isinstance(reference, torch.Tensor) or reference.dim() == 0:
            raise ValueError(
                f"pp_media: the collated batch has no '{self.batch_size_key}' tensor to take "
                f"the batch size from (keys: {sorted(batch)}). Keep it in the batch, or pass "
                "batch_size_key= naming a [B, ...] tensor."
            )
        return reference.shape[0]


def wrap_vlm_collate_for_pp(
    collate_fn: Callable[[Any], MutableMapping[str, Any]],
    n_microbatches: int,
    *,
    batch_size_key: str = "input_ids",
    even_microbatches: bool = False,
) -> Callable[[Any], MutableMapping[str, Any]]:
    """Wrap a VLM collate function so every batch it returns is prepared for pipelining.

    The batch size is read from ``batch[batch_size_key]`` (dim 0). Results that are not
    mappings, and batches without media, pass through unchanged. With
    ``even_microbatches=True`` every batch is also given by ``pad_to_even_microbatches``
    microbatches of equal size (torch's stages need that when M does not divide B).
    """
    check_n_microbatches(n_microbatches)
    return _PPCollate(collate_fn, n_microbatches, batch_size_key, even_microbatches)
