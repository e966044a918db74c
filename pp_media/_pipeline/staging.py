"""Stage-0 media routing for one schedule call, keyed by the engine's microbatch index.

Every torch schedule runs a stage's microbatch k through ``stage.forward_one_chunk(k, ...)``,
and the one-time shape inference through ``stage._prepare_forward_infra`` with microbatch 0's
inputs. While a step is staged, both are wrapped on the stage-0 object itself (instance
attributes, removed afterwards), so the forward that computes microbatch k sees exactly
microbatch k's media, whatever the schedule's order and however many microbatches are text-only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.utils.hooks import RemovableHandle

from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._layouts import GRID_IMAGES, SEED_LAYOUT, MediaLayout
from pp_media._pipeline.locate import PipelineView, locate_pipeline

_STATE_ATTR = "_pp_media_state"
_ALIGNMENT_ONLY = frozenset({"n_images_per_sample", "n_videos_per_sample"})
_INDEX_ATTR = "_vlm_chunk_idx"

MediaChunks = Mapping[str, Sequence[torch.Tensor]]

#: Attributes of the seed API on the stage-0 module, and the field each one carries.
_COMPAT_FIELDS: dict[str, tuple[str, ...]] = {
    "_vlm_pixel_values_chunks": ("pixel_values",),
    "_vlm_image_grid_hws_chunks": GRID_IMAGES.row_fields,
    "_vlm_num_patches_chunks": ("num_patches",),
    "_vlm_patch_pixel_values_chunks": ("patch_pixel_values",),
    "_vlm_patch_newline_mask_chunks": ("patch_newline_mask",),
    "_vlm_pixel_values_videos_chunks": ("pixel_values_videos",),
    "_vlm_video_grid_thw_chunks": ("video_grid_thw",),
}


@dataclass
class _StagedMedia:
    """What the stage-0 module carries during a staged step."""

    chunks: dict[str, list[torch.Tensor]]
    #: True when the torch stage is visible, so ``index`` is the engine's microbatch index.
    keyed: bool
    #: Microbatch of the stage-0 forward running now; None between forwards.
    index: int | None = None
    #: The media fields' groups, for handing a microbatch's media over as keyword arguments.
    layout: MediaLayout = SEED_LAYOUT
    n_microbatches: int = field(init=False)

    def __post_init__(self) -> None:
        lengths = {len(chunks) for chunks in self.chunks.values()}
        if len(lengths) > 1:
            sizes = {name: len(chunks) for name, chunks in self.chunks.items()}
            raise ValueError(
                f"pp_media: '{VLM_PP_MEDIA_KEY}' holds chunk lists of different lengths {sizes}; "
                "expected one chunk per microbatch for every field. Prepare the batch with "
                "prepare_vlm_media_for_pp."
            )
        self.n_microbatches = lengths.pop() if lengths else 0

    def expect_microbatches(self, n_microbatches: int | None) -> None:
        """Refuse media prepared for another microbatch count than the schedule runs."""
        if n_microbatches is not None and self.chunks and n_microbatches != self.n_microbatches:
            raise ValueError(
                f"pp_media: the media were prepared for {self.n_microbatches} microbatches but "
                f"the schedule runs {n_microbatches}; pass the schedule's n_microbatches to "
                "wrap_vlm_collate_for_pp / prepare_vlm_media_for_pp."
            )

    def microbatch(self, index: int) -> dict[str, torch.Tensor]:
        """Every field's chunk for microbatch ``index``."""
        if not 0 <= index < self.n_microbatches:
            raise IndexError(
                f"pp_media: the schedule computes microbatch {index} but the media were "
                f"prepared for {self.n_microbatches} microbatches; use the schedule's "
                "n_microbatches in wrap_vlm_collate_for_pp / prepare_vlm_media_for_pp."
            )
        return {name: chunks[index] for name, chunks in self.chunks.items()}

    def microbatch_kwargs(self, index: int) -> dict[str, torch.Tensor]:
        """Microbatch ``index``'s media as forward keyword arguments (see
        ``microbatch_media_kwargs``)."""
        return microbatch_media_kwargs(self.microbatch(index), self.layout)


@functools.lru_cache(maxsize=32)
def _group_fields(layout: MediaLayout) -> dict[str, frozenset[str]]:
    """``layout.group_fields()``, cached (layouts compare by identity)."""
    return layout.group_fields()


def microbatch_media_kwargs(
    media: Mapping[str, torch.Tensor], layout: MediaLayout = SEED_LAYOUT
) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for one microbatch: groups without media are left out.

    A text-only microbatch then calls the model exactly as a text-only batch would, with no
    empty ``pixel_values`` that a vision tower might not accept; which fields go with a pixel
    tensor is ``layout``'s (the one the media were prepared with). The per-sample counts
    (``n_images_per_sample``, ``n_videos_per_sample``) only serve the alignment and are not
    model inputs, so they are left out too.
    """
    kwargs = {name: chunk for name, chunk in media.items() if name not in _ALIGNMENT_ONLY}
    for primary, group in _group_fields(layout).items():
        if primary in kwargs and kwargs[primary].shape[0] == 0:
            for name in group:
                kwargs.pop(name, None)
    return kwargs


def current_media(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The media of the microbatch that ``module``'s forward is computing right now.

    Call it from the stage-0 module's forward (``module`` is ``model_parts[0]``). Returns a
    dict keyed by the processor's field names (a text-only microbatch gets empty tensors), or
    None outside a staged step. The microbatch is the engine's own index of this forward.
    """
    state: _StagedMedia | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        return None
    if not state.keyed:
        raise RuntimeError(
            "pp_media: current_media() needs the torch pipeline stage to know which microbatch "
            "is running, and the pp given to stage_vlm_media_for_pp exposes none. Pass the torch "
            "schedule itself as pp, or give pp.info a 'schedule' (the torch schedule) or "
            "'stages' (this rank's torch stages)."
        )
    if state.index is None:
        return None
    return state.microbatch(state.index)


class _StageHooks:
    """Instance-level wrappers on a torch stage that publish the running microbatch index."""

    _WRAPPED = ("forward_one_chunk", "_prepare_forward_infra")

    def __init__(
        self,
        stage: _PipelineStageBase,
        module: nn.Module,
        state: _StagedMedia,
        as_kwargs: bool,
    ) -> None:
        self._stage = stage
        self._module = module
        self._state = state
        self._as_kwargs = as_kwargs
        # Instance-level overrides someone else installed are put back on removal.
        self._shadowed = {name: vars(stage)[name] for name in self._WRAPPED if name in vars(stage)}
        original_forward = stage.forward_one_chunk
        original_infra = stage._prepare_forward_infra

        def forward_one_chunk(
            fwd_chunk_id: int, args: Any, kwargs: Any = None, *rest: Any, **options: Any
        ) -> Any:
            with self._running(fwd_chunk_id, kwargs) as kwargs:
                return original_forward(fwd_chunk_id, args, kwargs, *rest, **options)

        def prepare_forward_infra(
            num_microbatches: int, args: Any, kwargs: Any = None, *rest: Any, **options: Any
        ) -> Any:
            # Shape inference runs stage 0 on microbatch 0's inputs.
            with self._running(0, kwargs) as kwargs:
                return original_infra(num_microbatches, args, kwargs, *rest, **options)

        stage.forward_one_chunk = forward_one_chunk  # type: ignore[method-assign]
        stage._prepare_forward_infra = prepare_forward_infra  # type: ignore[method-assign]

    @contextmanager
    def _running(self, index: int, kwargs: dict[str, Any] | None) -> Iterator[Any]:
        """Publish ``index`` for the forward inside; yields its kwargs (plus media if asked)."""
        self._state.index = index
        setattr(self._module, _INDEX_ATTR, index)
        if self._as_kwargs:
            media = self._state.microbatch_kwargs(index)
            kwargs = {**(kwargs or {}), **media}
        try:
            yield kwargs
        finally:
            self._state.index = None

    def remove(self) -> None:
        for name in self._WRAPPED:
            vars(self._stage).pop(name, None)
        vars(self._stage).update(self._shadowed)


def _stage0_module(model_parts: Sequence[nn.Module], view: PipelineView) -> nn.Module:
    """The torch stage-0 module when it is one of ``model_parts``, else ``model_parts[0]``.

    V-shaped schedules put stage 0 and the last stage on one rank; matching by identity keeps
    the media on stage 0 whatever order the caller lists its parts in.
    """
    if view.first_stage is not None:
        for part in model_parts:
            if part is view.first_stage.submod:
                return part
    return model_parts[0]


def _shape_inference_pending(schedule: Any) -> bool:
    return any(
        getattr(schedule, flag, None) is False
        for flag in ("_stage_forward_initialized", "_stages_forward_initialized")
    )


def _has_static_shapes(stage: Any) -> bool:
    """Whether ``stage`` knows its output shapes without running a forward.

    True when outputs meta was configured analytically (``_outputs_meta``, older torch), when
    the stage has the seed's analytical-metadata API (``_configure_outputs_meta``, through which
    its pipeline sets the output shapes instead of running a forward), or static ``_user_meta``
    holds inputs and outputs (torch >= 2.13 ``input_args``/``output_args``). Only duck-typed
    stages get here: a visible torch stage is routed by its microbatch index instead.
    """
    if stage is None:
        return False
    if getattr(stage, "_outputs_meta", None) is not None:
        return True
    if callable(getattr(stage, "_configure_outputs_meta", None)):
        return True
    meta = getattr(stage, "_user_meta", None)
    return getattr(meta, "inputs", None) is not None and getattr(meta, "outputs", None) is not None


class MediaStaging:
    """Context manager behind ``stage_vlm_media_for_pp``; see that function."""

    def __init__(
        self,
        pp: Any,
        model_parts: Sequence[nn.Module],
        batch: MutableMapping[str, Any],
        *,
        as_kwargs: bool = False,
        layout: MediaLayout = SEED_LAYOUT,
    ) -> None:
        self._pp = pp
        self._model_parts = model_parts
        self._batch = batch
        self._as_kwargs = as_kwargs
        self._layout = layout
        self._module: nn.Module | None = None
        self._hooks: _StageHooks | None = None
        self._reset_handle: RemovableHandle | None = None

    def __enter__(self) -> MediaStaging:
        pp, model_parts, batch = self._pp, self._model_parts, self._batch
        self._pp = self._model_parts = self._batch = None
        view = locate_pipeline(pp)
        media = batch.get(VLM_PP_MEDIA_KEY)
        if media is None or not view.has_first_stage:
            batch.pop(VLM_PP_MEDIA_KEY, None)
            return self
        if not model_parts:
            raise ValueError("pp_media: model_parts is empty; expected this rank's stage modules.")
        module = _stage0_module(model_parts, view)
        if getattr(module, _STATE_ATTR, None) is not None:
            raise RuntimeError(
                "pp_media: the stage-0 module already has media staged; stage_vlm_media_for_pp "
                "blocks cannot be nested."
            )
        if self._as_kwargs and view.first_stage is None:
            raise ValueError(
                "pp_media: media as forward arguments needs the torch stage; pass a torch schedule."
            )
        chunks = {name: list(field_chunks) for name, field_chunks in media.items()}
        state = _StagedMedia(chunks, keyed=view.first_stage is not None, layout=self._layout)
        state.expect_microbatches(view.n_microbatches)
        batch.pop(VLM_PP_MEDIA_KEY)
        self._attach(module, state, view)
        return self

    def _attach(self, module: nn.Module, state: _StagedMedia, view: PipelineView) -> None:
        self._module = module
        setattr(module, _STATE_ATTR, state)
        for attr, fields in _COMPAT_FIELDS.items():
            name = next((name for name in fields if name in state.chunks), None)
            setattr(module, attr, state.chunks[name] if name is not None else None)
        setattr(module, _INDEX_ATTR, 0)
        if view.first_stage is not None:
            self._hooks = _StageHooks(view.first_stage, module, state, self._as_kwargs)
        elif _shape_inference_pending(view.schedule) and not _has_static_shapes(
            view.seed_first_stage
        ):
            self._reset_handle = module.register_forward_hook(self._reset_after_shape_inference)

    def _reset_after_shape_inference(self, module: nn.Module, args: Any, output: Any) -> None:
        setattr(module, _INDEX_ATTR, 0)
        if self._reset_handle is not None:
            self._reset_handle.remove()
            self._reset_handle = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._reset_handle is not None:
            self._reset_handle.remove()
            self._reset_handle = None
        module, self._module = self._module, None
        if module is not None:
            setattr(module, _STATE_ATTR, None)
            for attr in (*_COMPAT_FIELDS, _INDEX_ATTR):
                setattr(module, attr, None)


def stage_vlm_media_for_pp(
    pp: Any,
    model_parts: Sequence[nn.Module],
    batch: MutableMapping[str, Any],
) -> MediaStaging:
    """Attach a prepared batch's media to stage 0 for one schedule call (a context manager).

    Pops ``VLM_PP_MEDIA_KEY`` from ``batch`` (always, so raw media never reach
    ``schedule.step``). When this rank holds stage 0, ``model_parts[0]`` carries the media
    for the duration of the block; ``current_media(model_parts[0])`` returns the running
    microbatch's media, and the seed's ``_vlm_*_chunks`` / ``_vlm_chunk_idx`` attributes are
    set. Afterwards (also on error) nothing refers to the media any more.

    ``pp`` is a torch schedule, or the seed's object with ``pp.info.has_first_stage`` (and
    optionally ``pp.info.schedule`` / ``pp.info.stages``). With a visible torch stage,
    ``_vlm_chunk_idx`` is the engine's microbatch index at the start of every stage-0 forward.
    Without one it starts at 0, is reset after a pending shape-inference forward (not when
    stage 0 has static output metadata, ``_outputs_meta``, a complete ``_user_meta`` or the
    seed's ``_configure_outputs_meta``, so no such forward runs), and is otherwise left to
    the model code, as in the seed.
    """
    return MediaStaging(pp, model_parts, batch)
