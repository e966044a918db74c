"""Collate-side entry points: take the media out of a batch and store them per microbatch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, NamedTuple

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
    split_flat_counted,
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
_MEDIA_KEY_SET = frozenset(_VLM_MEDIA_KEYS)
_LOOKED_UP = (*_VLM_MEDIA_KEYS, *_ROW_KEYS)


class _Layout(NamedTuple):
    """Where each field of a batch goes; a function of the set of keys present only."""

    image_grid: str | None  # the grid that maps images to rows (the preferred one given)
    image_extras: tuple[str, ...]  # further per-image fields split like the grid
    step3: bool  # crops mapped by num_patches (no image grid, a Step3 field given)
    videos: bool
    video_extras: tuple[str, ...]
    unaligned: tuple[str, str] | None  # a media field nothing aligns, and what it needs
    removed: tuple[str, ...]  # keys taken out of the batch (absent ones are skipped)
    fast_grid: str | None  # the grid, when the batch is exactly flat images + grid + counts


@functools.lru_cache(maxsize=128)
def _layout(keys: frozenset[str]) -> _Layout:
    """Sort the present keys into groups once per key set: batches of a loader share it."""
    grids = [key for key in IMAGE_GRID_KEYS if key in keys]
    image_rows = [key for key in IMAGE_ROW_KEYS if key in keys]
    step3 = "pixel_values" in keys and not grids and any(key in keys for key in _STEP3_KEYS)
    consumed: set[str] = set()
    if "pixel_values" in keys:
        consumed |= {"pixel_values", "n_images_per_sample"}
        consumed |= set(_STEP3_KEYS) if step3 else {*grids, *image_rows}
    videos = "pixel_values_videos" in keys
    if videos:
        consumed |= {"pixel_values_videos", "video_grid_thw", "n_videos_per_sample"}
        consumed |= set(VIDEO_ROW_KEYS)
    unaligned = None
    for key in _VLM_MEDIA_KEYS:
        if key not in keys or key in consumed:
            continue
        if key in ("video_grid_thw", "n_videos_per_sample"):
            needs = "'pixel_values_videos'"
        elif key in _STEP3_KEYS:
            needs = "'pixel_values' and no image grid (Step3-style crops)"
        else:
            needs = "'pixel_values'"
        unaligned = (key, needs)
        break
    return _Layout(
        image_grid=grids[0] if grids else None,
        image_extras=(*grids[1:], *image_rows),
        step3=step3,
        videos=videos,
        video_extras=tuple(key for key in VIDEO_ROW_KEYS if key in keys),
        unaligned=unaligned,
        removed=(*_VLM_MEDIA_KEYS, *(key for key in _ROW_KEYS if key in consumed)),
        fast_grid=(
            grids[0]
            if grids and keys == {"pixel_values", grids[0], "n_images_per_sample"}
            else None
        ),
    )


def _plan_images(
    present: Mapping[str, Any],
    layout: _Layout,
    batch_size: int,
    n_microbatches: int,
    reader: DeferredHostRead,
) -> list[Finish]:
    """Plans for the image fields: a grid-described group, or Step3-style crops."""
    if not layout.step3:
        # A grid, or per-image pixel values mapped by n_images_per_sample (or one per sample).
        grid = layout.image_grid
        group = MediaGroup(
            "pixel_values",
            present["pixel_values"],
            grid,
            None if grid is None else present[grid],
            "n_images_per_sample",
            present.get("n_images_per_sample"),
            tuple((key, present[key]) for key in layout.image_extras),
        )
        return [plan_media_group(group, batch_size, n_microbatches, reader)]
    plans = [
        _only_given(
            plan_patch_mapped(
                present["pixel_values"],
                batch_size,
                n_microbatches,
                reader,
                **{key: present.get(key) for key in _STEP3_KEYS},
            ),
            given={"pixel_values", *(key for key in _STEP3_KEYS if key in present)},
        )
    ]
    if "n_images_per_sample" in present:
        plans.append(
            plan_per_sample(
                "n_images_per_sample", present["n_images_per_sample"], batch_size, n_microbatches
            )
        )
    return plans


def _only_given(finish: Finish, given: set[str]) -> Finish:
    """Keep only the fields the batch had: stage 0 must not get a ``num_patches`` it never had."""
    return lambda values: {name: chunks for name, chunks in finish(values).items() if name in given}


def _plan_videos(
    present: Mapping[str, Any],
    layout: _Layout,
    batch_size: int,
    n_microbatches: int,
    reader: DeferredHostRead,
) -> Finish:
    """The plan for the video group: flat patches with ``video_grid_thw`` (Qwen-VL), or one
    row per video mapped by ``n_videos_per_sample`` (LLaVA-OneVision's ``[n, frames, ...]``)."""
    grid = "video_grid_thw" if "video_grid_thw" in present else None
    group = MediaGroup(
        "pixel_values_videos",
        present["pixel_values_videos"],
        grid,
        present[grid] if grid else None,
        "n_videos_per_sample",
        present.get("n_videos_per_sample"),
        tuple((key, present[key]) for key in layout.video_extras),
    )
    return plan_media_group(group, batch_size, n_microbatches, reader)


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
    get = batch.get
    # Media fields and the per-item extras that travel with them (without media, not ours).
    present = {key: value for key in _LOOKED_UP if (value := get(key)) is not None}
    if present.keys().isdisjoint(_MEDIA_KEY_SET):
        return batch
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch already carries '{VLM_PP_MEDIA_KEY}' and also raw media "
            f"{sorted(present)}; prepare each batch once."
        )
    layout = _layout(frozenset(present))
    if layout.fast_grid is not None:
        # The common layout on a short path; anything unusual falls through to the plans below,
        # which split it or raise the error that names the field.
        grid = layout.fast_grid
        fast = split_flat_counted(
            present["pixel_values"],
            present[grid],
            present["n_images_per_sample"],
            batch_size,
            n_microbatches,
        )
        if fast is not None:
            for key in layout.removed:
                batch.pop(key, None)
            batch[VLM_PP_MEDIA_KEY] = {
                "pixel_values": fast[0],
                grid: fast[1],
                "n_images_per_sample": fast[2],
            }
            return batch

    reader = DeferredHostRead()
    plans: list[Finish] = []
    if "pixel_values" in present:
        plans += _plan_images(present, layout, batch_size, n_microbatches, reader)
    if layout.videos:
        plans.append(_plan_videos(present, layout, batch_size, n_microbatches, reader))
    if layout.unaligned is not None:
        key, needs = layout.unaligned
        raise media_error(
            key,
            present[key],
            f"to come with {needs}",
            "Without it there is nothing to align this field with; drop it or keep its media.",
        )

    values = reader.read()
    media: Chunks = {}
    for finish in plans:
        media.update(finish(values))

    pop = batch.pop
    for key in layout.removed:
        pop(key, None)
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
        balance_media: bool | Callable[[Mapping[str, Any]], Any] = False,
    ) -> None:
        self.collate_fn = collate_fn
        self.n_microbatches = n_microbatches
        self.batch_size_key = batch_size_key
        self.even_microbatches = even_microbatches
        self.balance_media = balance_media

    def __call__(self, examples: Any) -> Any:
        batch = self.collate_fn(examples)
        if not isinstance(batch, MutableMapping):
            return batch
        has_media = any(batch.get(key) is not None for key in _VLM_MEDIA_KEYS)
        balance = self.balance_media is not False
        if not (has_media or self.even_microbatches or balance):
            return batch
        batch_size = self._batch_size(batch)
        order = None
        if balance:
            from pp_media._core.balance import balance_microbatches

            cost = self.balance_media if callable(self.balance_media) else None
            order = balance_microbatches(batch, batch_size, self.n_microbatches, cost=cost)
        if has_media:
            prepare_vlm_media_for_pp(batch, batch_size, self.n_microbatches)
        if self.even_microbatches:
            pad_to_even_microbatches(batch, batch_size, self.n_microbatches)
        if order is not None:
            from pp_media._core.balance import record_sample_order

            record_sample_order(
                batch, order, batch_size, self.n_microbatches, padded=self.even_microbatches
            )
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
    balance_media: bool | Callable[[Mapping[str, Any]], Any] = False,
) -> Callable[[Any], MutableMapping[str, Any]]:
    """Wrap a VLM collate function so every batch it returns is prepared for pipelining.

    The batch size is read from ``batch[batch_size_key]`` (dim 0). Results that are not
    mappings, and batches without media, pass through unchanged. With
    ``even_microbatches=True`` every batch is also given by ``pad_to_even_microbatches``
    microbatches of equal size (torch's stages need that when M does not divide B).
    With ``balance_media=True`` (patches per sample as the cost) or a cost function of the
    batch, the samples are first permuted by ``balance_microbatches`` so that every
    microbatch's vision cost is about even, and the permutation is recorded under
    ``VLM_PP_SAMPLE_ORDER_KEY`` (one entry per engine row, -1 for pad rows; not a model input).
    """
    check_n_microbatches(n_microbatches)
    if not (isinstance(balance_media, bool) or callable(balance_media)):
        raise ValueError(
            "pp_media: balance_media must be True, False or a function of the batch returning "
            f"per-sample costs, got {type(balance_media).__name__}."
        )
    return _PPCollate(collate_fn, n_microbatches, batch_size_key, even_microbatches, balance_media)
