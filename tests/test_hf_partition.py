"""Stage layout: balanced layers, the rank of every stage per schedule, one-line errors."""

from __future__ import annotations

import pytest
from torch.distributed.pipelining.schedules import get_schedule_class

from pp_media._hf.partition import SCHEDULE_NAMES, balanced_layers, plan_stages


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "expected"),
    [(4, 2, [2, 2]), (5, 2, [2, 3]), (7, 4, [1, 2, 2, 2]), (6, 4, [1, 2, 2, 1]), (3, 3, [1, 1, 1])],
)
def test_balanced_layers_give_extra_layers_to_the_middle(
    n_layers: int, n_stages: int, expected: list[int]
) -> None:
    assert balanced_layers(n_layers, n_stages) == expected


def test_every_torch_schedule_name_resolves() -> None:
    for name in SCHEDULE_NAMES:
        assert plan_stages(name, 2, 8).schedule_class is get_schedule_class(name)


@pytest.mark.parametrize(
    ("schedule", "per_rank", "ranks"),
    [
        ("GPipe", 1, [0, 1]),
        ("1F1B", 1, [0, 1]),
        ("Interleaved1F1B", 2, [0, 1, 0, 1]),
        ("LoopedBFS", 2, [0, 1, 0, 1]),
        ("InterleavedZeroBubble", 2, [0, 1, 0, 1]),
        ("ZBVZeroBubble", 2, [0, 1, 1, 0]),
        ("DualPipeV", 2, [0, 1, 1, 0]),
    ],
)
def test_stage_ranks_follow_the_schedule_placement(
    schedule: str, per_rank: int, ranks: list[int]
) -> None:
    layout = plan_stages(schedule, 2, 8)
    assert layout.stages_per_rank == per_rank
    assert [layout.rank_of(stage) for stage in range(layout.n_stages)] == ranks
    held = sorted(stage for rank in range(2) for stage in layout.stages_of(rank))
    assert held == list(range(layout.n_stages))
    assert [i for layers in layout.layers for i in layers] == list(range(8))


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
