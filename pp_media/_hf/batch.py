"""A collated Hugging Face batch turned into what one pipeline step needs, on every rank.

Every rank receives the same collated batch and runs this, so a bad batch raises the same
error on every rank before the schedule starts (an error on one rank alone would leave the
others waiting in send/recv).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds
from pp_media._core.counts import count_items_per_sample
from pp_media._core.errors import check_microbatches, describe, media_error
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._core.prepare import prepare_vlm_media_for_pp
from pp_media._hf.count_errors import derived_count_error
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.loss import count_label_tokens
from pp_media._keys import VLM_PP_MEDIA_KEY

#: Per-sample text fields a step passes to the stages (plus the family's ``stage_fields``);
#: other batch keys are not model inputs.
TEXT_FIELDS = ("input_ids", "attention_mask", "labels")


@dataclass
class StepInputs:
    """One step's inputs: the text for the engine's split, the media for stage 0."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    label_tokens: int
    media: dict[str, list[torch.Tensor]]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


def add_rows_per_item(
    work: dict[str, Any], adapter: FamilyAdapter, config: Any, kind: MediaKind
) -> None:
    """Put the family's derived rows per item (``kind.rows_field``: Llama 4's tiles per image)
    into ``work`` when its media are present and it lacks them."""
    field = kind.rows_field
    if field is None or work.get(field) is not None or work.get(kind.pixel_field) is None:
        return
    rows = adapter.rows_per_item(config, kind, work)
    if rows is not None:
        work[field] = rows


def _items_per_sample(
    batch: Mapping[str, Any],
    adapter: FamilyAdapter,
    config: Any,
    kind: MediaKind,
    n_microbatches: int,
) -> torch.Tensor:
    """``n_images_per_sample``-style counts from the batch, or from its placeholder tokens (a
    failure names the microbatch and the first sample where they are not whole items)."""
    given = batch.get(kind.count_field)
    if given is not None:
        return given
    if kind.rows_per_sample:
        return torch.ones(batch["input_ids"].shape[0], dtype=torch.int64)
    token_id = adapter.token_id(config, kind)
    tokens = adapter.tokens_per_item(config, kind, batch)
    try:
        return count_items_per_sample(batch["input_ids"], token_id, tokens)
    except ValueError as refusal:
        located = derived_count_error(
            batch["input_ids"], token_id, tokens, kind.name, kind.count_field, n_microbatches
        )
        if located is None:
            raise
        raise located from refusal


@dataclass(frozen=True)
class PlaceholderCheck:
    """One sample's placeholder tokens of one media kind against the features its media give."""

    microbatch: int
    #: Index of the sample in the whole batch.
    sample: int
    #: The media kind's name: "image", "video".
    kind: str
    token_id: int
    #: Placeholder tokens of this kind in the sample's ``input_ids`` row.
    placeholders: int
    #: Features the sample's items of this kind will produce.
    features: int

    @property
    def ok(self) -> bool:
        return self.placeholders == self.features

    def message(self) -> str:
        """The error ``check_placeholders`` raises for this sample."""
        return (
            f"pp_media: microbatch {self.microbatch}, sample {self.sample} of the batch: "
            f"{self.placeholders} {self.kind} placeholder tokens (id {self.token_id}) in "
            f"input_ids, but its {self.kind}s give {self.features} features. Check that the "
            f"processor's {self.kind} token expansion matches the model config."
        )


def placeholder_checks(
    input_ids: torch.Tensor,
    media: Mapping[str, list[torch.Tensor]],
    adapter: FamilyAdapter,
    config: Any,
    n_microbatches: int,
) -> Iterator[PlaceholderCheck]:
    """Every sample's placeholder tokens against its media's features, per kind.

    Yields one ``PlaceholderCheck`` per media kind, microbatch and sample (in that nesting
    order), computed on the prepared per-microbatch chunks; lazily, so that a caller may stop
    at the first mismatch.
    """
    bounds = sample_bounds(input_ids.shape[0], n_microbatches)
    for kind in adapter.media:
        chunks = media.get(kind.pixel_field)
        counts = media.get(kind.count_field)
        token_id = adapter.token_id(config, kind)
        for k in range(n_microbatches):
            start, end = bounds[k], bounds[k + 1]
            placeholders = (input_ids[start:end] == token_id).sum(dim=1).tolist()
            if chunks is None or chunks[k].shape[0] == 0:
                per_sample = [0] * (end - start)
            else:
                own = {name: values[k] for name, values in media.items()}
                tokens = adapter.tokens_per_item(config, kind, own).tolist()
                items = [1] * (end - start) if counts is None else counts[k].tolist()
                offsets = [sum(items[:i]) for i in range(len(items) + 1)]
                per_sample = [sum(tokens[offsets[i] : offsets[i + 1]]) for i in range(len(items))]
            for i, (found, expected) in enumerate(zip(placeholders, per_sample, strict=True)):
                yield PlaceholderCheck(k, start + i, kind.name, token_id, found, expected)


def check_placeholders(
    input_ids: torch.Tensor,
    media: Mapping[str, list[torch.Tensor]],
    adapter: FamilyAdapter,
    config: Any,
    n_microbatches: int,
) -> None:
    """Each sample's placeholder tokens equal the features its media will produce.

    Checked per microbatch on the prepared chunks, before any vision tower runs; a mismatch
    names the microbatch, the sample, the token count and the feature count.
    """
    for check in placeholder_checks(input_ids, media, adapter, config, n_microbatches):
        if not check.ok:
            raise ValueError(check.message())


def _check_prepared_for(
    media: Mapping[str, list[torch.Tensor]], batch_size: int, n_microbatches: int
) -> None:
    """Media a collate prepared must be for this batch's rows and the pipeline's microbatches."""
    chunks = next(iter(media.values()), None)
    counts = media.get("n_images_per_sample", media.get("n_videos_per_sample"))
    rows = None if counts is None else sum(chunk.shape[0] for chunk in counts)
    if (chunks is not None and len(chunks) != n_microbatches) or rows not in (None, batch_size):
        raise ValueError(
            f"pp_media: the batch's '{VLM_PP_MEDIA_KEY}' was prepared for "
            f"{len(chunks or [])} microbatches of {rows} samples, but the pipeline runs "
            f"{n_microbatches} microbatches of this {batch_size}-row batch. Pass the collate "
            "function's output without prepare_vlm_media_for_pp / even_microbatches: "
            "VLMPipeline.step splits and pads it itself."
        )


def check_required_fields(batch: Mapping[str, Any], adapter: FamilyAdapter, config: Any) -> None:
    """Each media kind present in ``batch`` comes with the fields its family declares
    (``MediaKind.requires`` / ``requires_with``: Qwen-VL's grids, LLaVA-NeXT's ``image_sizes``,
    ...); a missing one is refused by name here instead of failing inside the placeholder rule
    or on stage 0."""
    for kind in adapter.media:
        if batch.get(kind.pixel_field) is None:
            continue
        pairs = [(kind.pixel_field, name) for name in kind.requires] + list(kind.requires_with)
        for present, needed in pairs:
            value = batch.get(present)
            if value is not None and batch.get(needed) is None:
                raise ValueError(
                    f"pp_media: the batch has '{present}' ({describe(value)}) but no "
                    f"'{needed}', which {config.model_type} needs with its {kind.name}s to "
                    f"count their placeholder tokens and compute their features. Pass the "
                    f"processor's '{needed}' in the batch (keys: {sorted(batch)})."
                )


def reference_batch(
    batch: Mapping[str, Any], adapter: FamilyAdapter, config: Any
) -> dict[str, Any]:
    """``batch`` as the unsplit model takes it, so that ``model(**reference_batch(...)).loss``
    is the loss a pipeline step computes: the fields a step derives added (the family's
    ``step_fields``: Qwen-VL's ``mm_token_type_ids``), the per-sample counts
    (``n_images_per_sample``, ...) and rows per item (Llama 4's ``n_tiles_per_image``), which
    only align media, left out. A new dict; the tensors are the batch's own or derived."""
    if VLM_PP_MEDIA_KEY in batch:
        raise ValueError(
            f"pp_media: the batch's media were already split into '{VLM_PP_MEDIA_KEY}'; build "
            "the reference batch from the collate function's output before "
            "prepare_vlm_media_for_pp."
        )
    check_required_fields(batch, adapter, config)
    counts = {kind.count_field for kind in adapter.media}
    counts |= {kind.rows_field for kind in adapter.media if kind.rows_field is not None}
    inputs = {name: value for name, value in batch.items() if name not in counts}
    has_media = any(batch.get(kind.pixel_field) is not None for kind in adapter.media)
    inputs.update(adapter.step_fields(config, batch, has_media))
    return inputs


def prepare_step_inputs(
    batch: Mapping[str, Any], adapter: FamilyAdapter, config: Any, n_microbatches: int
) -> StepInputs:
    """Counts derived, media split per microbatch, placeholders checked, rows padded so that
    every microbatch has the same shape. The caller's batch is not modified."""
    for name in ("input_ids", "labels"):
        if not isinstance(batch.get(name), torch.Tensor):
            raise ValueError(
                f"pp_media: the batch needs a '{name}' tensor [B, T] (keys: {sorted(batch)})."
            )
    work: dict[str, Any] = dict(batch)
    input_ids = work["input_ids"]
    if input_ids.dim() != 2 or work["labels"].shape != input_ids.shape:
        raise media_error(
            "labels", work["labels"], f"the shape of input_ids {tuple(input_ids.shape)}"
        )
    batch_size = input_ids.shape[0]
    check_microbatches(batch_size, n_microbatches)
    if VLM_PP_MEDIA_KEY not in work:
        check_required_fields(work, adapter, config)
    has_media = VLM_PP_MEDIA_KEY in work or any(
        work.get(kind.pixel_field) is not None for kind in adapter.media
    )
    if VLM_PP_MEDIA_KEY not in work and has_media:
        for kind in adapter.media:
            if work.get(kind.pixel_field) is not None:
                add_rows_per_item(work, adapter, config, kind)
                work[kind.count_field] = _items_per_sample(
                    work, adapter, config, kind, n_microbatches
                )
        prepare_vlm_media_for_pp(work, batch_size, n_microbatches, layout=adapter.media_layout)
    media: dict[str, list[torch.Tensor]] = work.pop(VLM_PP_MEDIA_KEY, {})
    _check_prepared_for(media, batch_size, n_microbatches)
    media = adapter.stage_media(config, media)
    check_placeholders(input_ids, media, adapter, config, n_microbatches)

    text = {name: work[name] for name in TEXT_FIELDS if work.get(name) is not None}
    text.update(adapter.step_fields(config, work, has_media))
    label_tokens = count_label_tokens(text["labels"])
    pad_to_even_microbatches(text, batch_size, n_microbatches, keys=tuple(text))
    kwargs = {name: value for name, value in text.items() if name not in ("input_ids", "labels")}
    return StepInputs(text["input_ids"], text["labels"], label_tokens, media, kwargs)


def shape_change_message(
    batch_shape: tuple[int, ...],
    shape: tuple[int, ...],
    expected: tuple[int, ...],
    n_microbatches: int,
) -> str:
    """The error for a batch whose padded microbatch shape differs from the first batch's."""
    rows = expected[0]
    smallest, largest = max(n_microbatches, (rows - 1) * n_microbatches + 1), rows * n_microbatches
    sizes = f"B = {smallest}" if smallest == largest else f"B from {smallest} to {largest}"
    return (
        f"pp_media: this batch ({batch_shape[0]} samples x {batch_shape[1]} tokens) gives "
        f"microbatches of {list(shape)} tokens but the pipeline was set up for "
        f"{list(expected)} by its first batch: torch's stages fix their receive buffers at the "
        f"first step, so every batch must give the same padded microbatch shape [ceil(B / "
        f"{n_microbatches}), T]. Pad every batch to T = {expected[1]} tokens; the batch size B "
        f"may vary as long as ceil(B / {n_microbatches}) stays {rows} ({sizes})."
    )
