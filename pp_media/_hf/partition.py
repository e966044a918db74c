"""Which decoder layers each stage runs, and which rank runs each stage, per torch schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)

#: The schedules torch ships, by the names ``get_schedule_class`` takes.
SCHEDULE_NAMES: tuple[str, ...] = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
_V_SHAPED = (ScheduleZBVZeroBubble, ScheduleDualPipeV)


@dataclass(frozen=True)
class StageLayout:
    """The pipeline's stages: their layers and their ranks."""

    schedule_class: type
    pp_size: int
    stages_per_rank: int
    #: ``layers[s]`` are the global decoder-layer indices of stage s.
    layers: tuple[tuple[int, ...], ...]
    #: With ``layers_per_stage="auto"``: the estimated costs the split was chosen from
    #: (``pp_media._hf.auto_split.SplitEstimate``); None for explicit or balanced splits.
    costs: Any = None

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(len(layers) for layers in self.layers)

    @property
    def n_stages(self) -> int:
        return self.pp_size * self.stages_per_rank

    @property
    def v_shaped(self) -> bool:
        return issubclass(self.schedule_class, _V_SHAPED)

    def rank_of(self, stage: int) -> int:
        """Loop placement (stage s on rank s % pp), or V placement for ZBV and DualPipeV."""
        if self.v_shaped and stage >= self.pp_size:
            return self.n_stages - 1 - stage
        return stage % self.pp_size

    def first_layer(self, stage: int) -> int:
        """Global index of stage ``stage``'s first decoder layer (or where it would be)."""
        return sum(len(layers) for layers in self.layers[:stage])

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s in range(self.n_stages) if self.rank_of(s) == rank)


def schedule_class(name: str) -> type:
    """torch's schedule class for ``name`` (case-insensitive), with the valid names on error."""
    try:
        return get_schedule_class(name)
    except ValueError:
        raise ValueError(
            f"pp_media: unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}."
        ) from None


def default_stages_per_rank(cls: type) -> int:
    """1 for single-stage schedules (GPipe, 1F1B), 2 for the interleaved and V schedules."""
    return 1 if issubclass(cls, PipelineScheduleSingle) else 2


def balanced_layers(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage, as even as possible; the extra layers go to the middle stages, since
    stage 0 also runs the vision tower and the last stage the LM head and loss; between two
    equally central stages the later one gets it (vision towers outweigh LM heads)."""
    counts = [n_layers // n_stages] * n_stages
    middle = (n_stages - 1) / 2
    for stage in sorted(range(n_stages), key=lambda s: (abs(s - middle), -s))[
        : n_layers % n_stages
    ]:
        counts[stage] += 1
    return counts


def plan_stages(
    schedule: str,
    pp_size: int,
    n_layers: int,
    stages_per_rank: int | None = None,
    layers_per_stage: Sequence[int] | None = None,
) -> StageLayout:
    """Validate the combination and lay the decoder layers out over the stages."""
    cls = schedule_class(schedule)
    per_rank = default_stages_per_rank(cls) if stages_per_rank is None else stages_per_rank
    if pp_size < 1 or per_rank < 1:
        raise ValueError(
            f"pp_media: pp_size ({pp_size}) and stages per rank ({per_rank}) must be >= 1."
        )
    if issubclass(cls, PipelineScheduleSingle) and per_rank != 1:
        raise ValueError(
            f"pp_media: schedule {schedule!r} runs one stage per rank; got {per_rank} virtual "
            "stages. Use Interleaved1F1B, LoopedBFS or InterleavedZeroBubble for more."
        )
    if issubclass(cls, _V_SHAPED) and per_rank != 2:
        raise ValueError(
            f"pp_media: schedule {schedule!r} is V-shaped and runs exactly 2 stages per rank; "
            f"got {per_rank}."
        )
    n_stages = pp_size * per_rank
    if n_stages < 2:
        raise ValueError(
            "pp_media: a pipeline needs at least 2 stages; use pp_size >= 2 (or 2 virtual stages)."
        )
    if layers_per_stage is None:
        if n_stages > n_layers:
            raise ValueError(
                f"pp_media: {n_stages} stages but the model has {n_layers} decoder layers; use "
                f"at most {n_layers} stages (pp_size x virtual stages)."
            )
        counts = balanced_layers(n_layers, n_stages)
    else:
        counts = list(layers_per_stage)
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ValueError(
                f"pp_media: layers_per_stage {counts} must have {n_stages} non-negative entries "
                f"(one per stage) that sum to the model's {n_layers} decoder layers."
            )
    starts = [sum(counts[:s]) for s in range(n_stages)]
    layers = tuple(
        tuple(range(start, start + count)) for start, count in zip(starts, counts, strict=True)
    )
    return StageLayout(cls, pp_size, per_rank, layers)
