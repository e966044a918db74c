"""One call for a whole pipeline step with media as ordinary stage-0 forward arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._layouts import SEED_LAYOUT, MediaLayout
from pp_media._pipeline.locate import schedule_stages
from pp_media._pipeline.staging import MediaStaging, _StagedMedia


@functools.cache
def _accepts_presplit(schedule_type: type) -> bool:
    """torch >= 2.14 lets ``step`` take pre-split ``arg_mbs`` / ``kwarg_mbs`` / ``target_mbs``."""
    parameters = inspect.signature(schedule_type.step).parameters
    return all(name in parameters for name in ("arg_mbs", "kwarg_mbs", "target_mbs"))


def step_with_media(
    schedule: Any,
    *args: Any,
    media: Mapping[str, Sequence[torch.Tensor]] | None = None,
    target: torch.Tensor | None = None,
    losses: list[torch.Tensor] | None = None,
    return_outputs: bool = True,
    loss_kwargs: dict[str, Any] | None = None,
    forward_only: bool = False,
    layout: MediaLayout = SEED_LAYOUT,
    **kwargs: Any,
) -> Any:
    """``schedule.step(*args, target=..., losses=..., **kwargs)``, plus the batch's media.

    ``media`` is a prepared batch's ``batch.pop(VLM_PP_MEDIA_KEY)``. The text arguments are
    split by the engine's own rule; microbatch k's media reach stage 0's forward as keyword
    arguments (``pixel_values=``, ``image_grid_thw=``, ...; a microbatch without images gets
    none of the image fields), and no other stage sees them. Where torch accepts pre-split
    microbatches (``step(arg_mbs=, kwarg_mbs=, target_mbs=)``, torch >= 2.14) and this rank runs
    only stage 0, that public API is used; otherwise (torch 2.13, or a rank that also runs
    later stages, whose forwards would receive every kwarg) the keyed stage-0 routing is.
    Returns what ``schedule.step`` returns.

    ``layout``: the media layout the batch was prepared with (``prepare_vlm_media_for_pp``'s
    ``layout``), which says which fields go with a pixel tensor that a microbatch lacks.

    ``forward_only=True`` runs torch's ``schedule.eval`` instead: the same microbatches, media
    and losses, no backward (wrap the call in ``torch.no_grad()`` to build no graph either).
    """
    stages = schedule_stages(schedule)
    if stages is None:
        raise TypeError(
            "pp_media: step_with_media needs a torch pipeline schedule (PipelineScheduleSingle "
            f"or PipelineScheduleMulti); got {type(schedule).__name__}."
        )
    step_options: dict[str, Any] = {"losses": losses, "return_outputs": return_outputs}
    if loss_kwargs is not None:  # only torch versions that have it accept it
        step_options["loss_kwargs"] = loss_kwargs
    run = schedule.eval if forward_only else schedule.step
    has_first = any(stage.is_first for stage in stages)
    if not media or not has_first:
        return run(*args, target=target, **step_options, **kwargs)

    if _accepts_presplit(type(schedule)) and len(stages) == 1:
        chunks = {name: list(field_chunks) for name, field_chunks in media.items()}
        staged = _StagedMedia(chunks, keyed=True, layout=layout)
        n_microbatches = schedule._n_microbatches
        staged.expect_microbatches(n_microbatches)
        arg_mbs, kwarg_mbs = split_args_kwargs_into_chunks(
            args, kwargs, n_microbatches, schedule._args_chunk_spec, schedule._kwargs_chunk_spec
        )
        for index, microbatch_kwargs in enumerate(kwarg_mbs):
            microbatch_kwargs.update(staged.microbatch_kwargs(index))
        target_mbs = None if target is None else list(torch.tensor_split(target, n_microbatches))
        return run(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs, **step_options)

    first = next(stage for stage in stages if stage.is_first)
    batch = {VLM_PP_MEDIA_KEY: media}
    with MediaStaging(schedule, [first.submod], batch, as_kwargs=True, layout=layout):
        return run(*args, target=target, **step_options, **kwargs)
