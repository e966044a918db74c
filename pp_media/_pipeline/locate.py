"""Finding stage 0 in what the caller hands us: a torch schedule or the seed's ``pp``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.pipelining.stage import _PipelineStageBase


@dataclass(frozen=True)
class PipelineView:
    """What the staging needs to know about this rank's part of the pipeline."""

    has_first_stage: bool
    #: The torch stage that runs stage 0 on this rank, when it can be seen.
    first_stage: _PipelineStageBase | None
    #: The schedule's microbatch count, when a torch schedule can be seen.
    n_microbatches: int | None = None
    #: The seed's duck-typed schedule, kept only to detect a pending shape inference.
    schedule: Any = None
    #: The seed's duck-typed stage 0 (``is_first`` true), kept only to read its shape metadata.
    seed_first_stage: Any = None


def schedule_stages(schedule: Any) -> tuple[_PipelineStageBase, ...] | None:
    """The local stages of a torch schedule, or None if ``schedule`` is not one."""
    if isinstance(schedule, PipelineScheduleSingle):
        return (schedule._stage,)
    if isinstance(schedule, PipelineScheduleMulti):
        return tuple(schedule._stages)
    return None


def _torch_stages(candidates: Any) -> tuple[_PipelineStageBase, ...]:
    if candidates is None:
        return ()
    try:
        items = tuple(candidates)
    except TypeError:
        return ()
    return tuple(stage for stage in items if isinstance(stage, _PipelineStageBase))


def _seed_first_stage(info: Any, schedule: Any) -> Any:
    """The duck-typed stage with ``is_first`` true in ``info.stages`` or the schedule, if any."""
    for candidates in (
        getattr(info, "stages", None),
        (getattr(schedule, "_stage", None),),
        getattr(schedule, "_stages", None),
    ):
        try:
            items = tuple(candidates or ())
        except TypeError:
            continue
        first = next((stage for stage in items if getattr(stage, "is_first", False) is True), None)
        if first is not None:
            return first
    return None


def _view_from_stages(stages: tuple[_PipelineStageBase, ...], schedule: Any = None) -> PipelineView:
    first = next((stage for stage in stages if stage.is_first), None)
    n_microbatches = getattr(schedule, "_n_microbatches", None)
    return PipelineView(first is not None, first, n_microbatches)


def locate_pipeline(pp: Any) -> PipelineView:
    """Resolve ``pp`` into a ``PipelineView``.

    ``pp`` is a torch ``PipelineScheduleSingle``/``PipelineScheduleMulti``, or any object with
    ``pp.info.has_first_stage`` and optionally ``pp.info.schedule`` / ``pp.info.stages``.
    """
    stages = schedule_stages(pp)
    if stages is not None:
        return _view_from_stages(stages, pp)
    info = getattr(pp, "info", None)
    if info is None or not hasattr(info, "has_first_stage"):
        raise TypeError(
            "pp_media: pp must be a torch pipeline schedule (PipelineScheduleSingle or "
            "PipelineScheduleMulti) or an object with pp.info.has_first_stage; got "
            f"{type(pp).__name__}."
        )
    schedule = getattr(info, "schedule", None)
    torch_schedule = schedule if schedule_stages(schedule) is not None else None
    stages = schedule_stages(schedule) or _torch_stages(getattr(info, "stages", None))
    if stages:
        view = _view_from_stages(stages, torch_schedule)
        if view.has_first_stage != bool(info.has_first_stage):
            raise ValueError(
                f"pp_media: pp.info.has_first_stage is {info.has_first_stage!r} but this "
                f"rank's torch stages {[stage.stage_index for stage in stages]} say "
                f"{view.has_first_stage}."
            )
        return view
    return PipelineView(
        bool(info.has_first_stage),
        None,
        schedule=schedule,
        seed_first_stage=_seed_first_stage(info, schedule),
    )
