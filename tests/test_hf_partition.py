"""Stage layout: balanced layers, the rank of every stage per schedule, one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from pp_media._hf.partition import SCHEDULE_NAMES, StageLayout, balanced_layers, plan_stages


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "expected"),
    [(4, 2, [2, 2]), (5, 2, [2, 3]), (7, 4, [1, 2, 2, 2]), (6, 4, [1, 2, 2, 1]), (3, 3, [1, 1, 1])],
)
def test_balanced_layers_give_extra_layers_to_the_middle(
    n_layers: int, n_stages: int, expected: list[int]
) -> None:
    assert balanced_layers(n_layers, n_stages) == expected


def _torch_stages_per_rank(schedule: str, layout: StageLayout) -> dict[int, list[int]]:
    """Per rank, the stage indices torch itself runs there for ``layout``: the stages in the
    ``pipeline_order`` that torch's own schedule class builds from each rank's stages
    (multi-stage schedules; DualPipeV's overlap actions, stage -1, left out), or the mapping
    torch's stages use to find their peers (single-stage schedules, which build no order).
    The schedule class is looked up by the name as the user spelled it."""
    cls = get_schedule_class(schedule)
    if issubclass(cls, PipelineScheduleSingle):
        torch_ranks = generate_stage_to_rank_mapping(layout.pp_size, layout.n_stages)
        return {
            rank: [s for s, r in sorted(torch_ranks.items()) if r == rank]
            for rank in range(layout.pp_size)
        }
    built: dict[int, list[int]] = {}
    for rank in range(layout.pp_size):
        stages = [
            SimpleNamespace(
                stage_index=stage,
                num_stages=layout.n_stages,
                group_size=layout.pp_size,
                group_rank=rank,
                is_first=stage == 0,
                is_last=stage == layout.n_stages - 1,
                submod=torch.nn.Module(),
            )
            for stage in layout.stages_of(rank)
        ]
        order = cls(stages, 8).pipeline_order[rank]
        built[rank] = sorted({a.stage_index for a in order if a is not None and a.stage_index >= 0})
    return built


#: (schedule, pp_size, stages per rank): every schedule at 2 to 4 ranks, names in any case,
#: and 3 stages per rank where a schedule takes more than 2.
PLACEMENTS = [
    *((name, pp_size, None) for name in SCHEDULE_NAMES for pp_size in (2, 3, 4)),
    ("interleaved1f1b", 2, None),
    ("zbvzerobubble", 2, None),
    *((name, 2, 3) for name in ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")),
]


@pytest.mark.parametrize(("schedule", "pp_size", "stages_per_rank"), PLACEMENTS)
def test_stage_ranks_are_those_torch_assigns(
    schedule: str, pp_size: int, stages_per_rank: int | None
) -> None:
    """``rank_of`` / ``stages_of`` agree with the stages torch's own schedule classes run on
    each rank (loop placement, or V placement for ZBVZeroBubble and DualPipeV), every stage on
    exactly one rank, the layers in order over the stages."""
    layout = plan_stages(schedule, pp_size, 24, stages_per_rank)
    expected = _torch_stages_per_rank(schedule, layout)
    assert {rank: list(layout.stages_of(rank)) for rank in range(pp_size)} == expected
    for rank, stages in expected.items():
        assert all(layout.rank_of(stage) == rank for stage in stages)
    held = sorted(stage for rank in range(pp_size) for stage in layout.stages_of(rank))
    assert held == list(range(layout.n_stages))
    assert [i for layers in layout.layers for i in layers] == list(range(24))


def test_explicit_layers_per_stage() -> None:
    layout = plan_stages("Interleaved1F1B", 2, 6, 2, [0, 2, 3, 1])
    assert layout.layers == ((), (0, 1), (2, 3, 4), (5,))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("Foo", 2, 4),
            "pp_media: unknown schedule 'Foo'; choose one of GPipe, 1F1B, Interleaved1F1B, "
            "LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV.",
        ),
        (
            ("1F1B", 2, 4, 2),
            "pp_media: schedule '1F1B' runs one stage per rank; got 2 virtual stages. Use "
            "Interleaved1F1B, LoopedBFS or InterleavedZeroBubble for more.",
        ),
        (
            ("DualPipeV", 2, 8, 3),
            "pp_media: schedule 'DualPipeV' is V-shaped and runs exactly 2 stages per rank; got 3.",
        ),
        (
            ("1F1B", 1, 4),
            "pp_media: a pipeline needs at least 2 stages; use pp_size >= 2 (or 2 virtual stages).",
        ),
        (
            ("Interleaved1F1B", 3, 4),
            "pp_media: 6 stages but the model has 4 decoder layers; use at most 4 stages "
            "(pp_size x virtual stages).",
        ),
        (
            ("1F1B", 2, 4, None, [1, 2]),
            "pp_media: layers_per_stage [1, 2] must have 2 non-negative entries (one per stage) "
            "that sum to the model's 4 decoder layers.",
        ),
    ],
)
def test_impossible_layouts_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError) as error:
        plan_stages(*args)
    assert str(error.value) == message
