"""Collate-side entry points: take the media out of a batch and store them per microbatch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch

from pp_media._core.errors import check_microbatches, check_n_microbatches
from pp_media._core.host_read import DeferredHostRead
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._core.reading import flat_counted_fields, present_media, read_media
from pp_media._core.row_maps import Chunks, plan_media_group, split_flat_counted
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._layouts import SEED_LAYOUT, MediaLayout


def prepare_vlm_media_for_pp(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    *,
    layout: MediaLayout = SEED_LAYOUT,
) -> MutableMapping[str, Any]:
    """Move the batch's media into ``batch[VLM_PP_MEDIA_KEY]``, pre-split per microbatch.

    The stored value maps each processor field name (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ...) to a list of exactly ``n_microbatches`` views; microbatch k
    holds the media of the samples that ``torch.distributed.pipelining`` puts into microbatch k.
    Everything is validated before the batch is touched: on error the batch is unchanged.
    A batch without media comes back unchanged. ``layout`` describes the media fields
    (``pp_media.MediaLayout``; default: the seed's processor fields). Returns ``batch``
    (mutated in place).
    """
    check_microbatches(batch_size, n_microbatches)
    present = present_media(batch, layout)
    if not present:
        return batch
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch already carries '{VLM_PP_MEDIA_KEY}' and also raw media "
            f"{sorted(present)}; prepare each batch once."
        )
    keys = frozenset(present)
    fast = flat_counted_fields(layout, keys)
    if fast is not None:
        # The common layout on a short path; anything unusual falls through to the plans below,
        # which split it or raise the error that names the field.
        pixels, grid, counts = fast
        chunks = split_flat_counted(
            present[pixels], present[grid], present[counts], batch_size, n_microbatches
        )
        if chunks is not None:
            for key in layout.media_fields:
                batch.pop(key, None)
            batch[VLM_PP_MEDIA_KEY] = {pixels: chunks[0], grid: chunks[1], counts: chunks[2]}
            return batch

    reading = read_media(present, batch_size, layout)
    reader = DeferredHostRead()
    plans = [plan_media_group(group, n_microbatches, reader) for group in reading.groups]
    values = reader.read()
    media: Chunks = {}
    for finish in plans:
        media.update(finish(values))
    _store(batch, reading.removed, media)
    return batch


def _store(batch: MutableMapping[str, Any], removed: tuple[str, ...], media: Chunks) -> None:
    pop = batch.pop
    for key in removed:
        pop(key, None)
    batch[VLM_PP_MEDIA_KEY] = media


class _PPCollate:
    """Picklable collate wrapper (DataLoader workers may be spawned, not forked)."""

    def __init__(
        self,
        collate_fn: Callable[[Any], MutableMapping[str, Any]],
        n_microbatches: int,
        batch_size_key: str,
        even_microbatches: bool,
        balance_media: bool | Callable[[Mapping[str, Any]], Any] = False,
        layout: MediaLayout = SEED_LAYOUT,
    ) -> None:
        self.layout = layout
        self.collate_fn = collate_fn
        self.n_microbatches = n_microbatches
        self.batch_size_key = batch_size_key
        self.even_microbatches = even_microbatches
        self.balance_media = balance_media

    def __call__(self, examples: Any) -> Any:
        batch = self.collate_fn(examples)
        if not isinstance(batch, MutableMapping):
            return batch
        layout = self.layout
        has_media = any(batch.get(key) is not None for key in layout.media_fields)
        balance = self.balance_media is not False
        if not (has_media or self.even_microbatches or balance):
            return batch
        batch_size = self._batch_size(batch)
        order = None
        m = self.n_microbatches
        if balance:
            from pp_media._core.balanced import balance_and_prepare_vlm_media_for_pp

            cost = self.balance_media if callable(self.balance_media) else None
            order = balance_and_prepare_vlm_media_for_pp(
                batch, batch_size, m, cost=cost, layout=layout
            )
        elif has_media:
            prepare_vlm_media_for_pp(batch, batch_size, m, layout=layout)
        if self.even_microbatches:
            pad_to_even_microbatches(batch, batch_size, m)
        if order is not None:
            from pp_media._core.balanced import record_sample_order

            record_sample_order(batch, order, batch_size, m, padded=self.even_microbatches)
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
    layout: MediaLayout = SEED_LAYOUT,
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
    Balancing and splitting then share one reading of the batch
    (``balance_and_prepare_vlm_media_for_pp``). ``layout`` describes the media fields
    (``pp_media.MediaLayout``; default: the seed's processor fields).
    """
    check_n_microbatches(n_microbatches)
    if not (isinstance(balance_media, bool) or callable(balance_media)):
        raise ValueError(
            "pp_media: balance_media must be True, False or a function of the batch returning "
            f"per-sample costs, got {type(balance_media).__name__}."
        )
    if not isinstance(layout, MediaLayout):
        raise TypeError(
            f"pp_media: layout must be a pp_media.MediaLayout, got {type(layout).__name__}."
        )
    return _PPCollate(
        collate_fn, n_microbatches, batch_size_key, even_microbatches, balance_media, layout
    )
