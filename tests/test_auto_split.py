"""The automatic split's search, its option parsing and the FLOP model, without processes."""

from __future__ import annotations

import itertools

import pytest
import torch

from pp_media._hf.auto_split import (
    StageCosts,
    auto_layers_per_stage,
    estimate,
    layers_option,
)
from pp_media._hf.partition import plan_stages


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to give ``total`` layers to ``parts`` stages (zeros allowed)."""
    return [
        tuple(b - a - 1 for a, b in zip((-1, *cut), (*cut, total + parts - 1), strict=True))
        for cut in itertools.combinations(range(total + parts - 1), parts - 1)
    ]


def brute_force(costs: StageCosts, n_layers: int, layout: object) -> tuple[float, float]:
    """The best (slowest rank, then that split's slowest stage) over every split."""
    best = None
    for counts in compositions(n_layers, layout.n_stages):
        split = estimate(costs, counts, layout.rank_of, layout.pp_size)
        key = (split.bottleneck, max(split.stages))
        best = key if best is None or key < best else best
    return best


SCHEDULES = [("1F1B", 2), ("1F1B", 3), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2)]
COSTS = [
    StageCosts(first=0.0, layer=1.0, last=0.0),
    StageCosts(first=9.0, layer=1.0, last=2.3),
    StageCosts(first=30.0, layer=1.0, last=0.5, stage=0.2),
    StageCosts(first=1.5, layer=2.0, last=7.0),
    StageCosts(first=2.2, layer=0.7, last=0.1, stage=1.3),
]


def test_compositions_are_every_split() -> None:
    assert compositions(2, 2) == [(0, 2), (1, 1), (2, 0)]
    assert len(compositions(7, 4)) == 120  # C(10, 3)


@pytest.mark.parametrize("schedule,pp_size", SCHEDULES)
@pytest.mark.parametrize("costs", COSTS, ids=range(len(COSTS)))
def test_search_matches_brute_force(schedule: str, pp_size: int, costs: StageCosts) -> None:
    """Slowest rank as low as any split makes it, for 1..9 layers; among those, the slowest
    stage no higher than the best split's within its rank."""
    for n_layers in range(1, 10):
        layout = plan_stages(schedule, pp_size, 12)  # only for n_stages and rank_of
        counts = auto_layers_per_stage(costs, n_layers, layout.n_stages, layout.rank_of, pp_size)
        assert sum(counts) == n_layers and min(counts) >= 0
        split = estimate(costs, counts, layout.rank_of, pp_size)
        best_rank, _ = brute_force(costs, n_layers, layout)
        assert split.bottleneck == pytest.approx(best_rank), (schedule, n_layers, counts)


def test_vision_heavy_stage_0_gets_no_layer_and_costs_add_up() -> None:
    costs = StageCosts(first=30.0, layer=1.0, last=0.5, stage=0.2)
    counts = auto_layers_per_stage(costs, 28, 2, lambda s: s, 2)
    assert counts == (0, 28)
    split = estimate(costs, counts, lambda s: s, 2)
    assert split.stages == (30.2, 28.7)
    assert split.ranks == split.stages
    assert split.ideal == pytest.approx(58.9 / 2)


def test_even_costs_give_the_even_split() -> None:
    costs = StageCosts(first=0.0, layer=1.0, last=0.0)
    assert auto_layers_per_stage(costs, 8, 4, lambda s: s, 4) == (2, 2, 2, 2)


def test_a_layer_must_cost_something() -> None:
    with pytest.raises(ValueError, match=r"pp_media: a decoder layer's estimated cost is 0\.0"):
        auto_layers_per_stage(StageCosts(first=1.0, layer=0.0, last=1.0), 4, 2, lambda s: s, 2)


@pytest.mark.parametrize(
    "value,expected",
    [(None, None), ("auto", "auto"), (" AUTO ", "auto"), ("1,3", (1, 3)), ([0, 4], (0, 4))],
)
def test_layers_option_accepts(value: object, expected: object) -> None:
    assert layers_option(value) == expected


def test_layers_option_refuses_clearly() -> None:
    with pytest.raises(ValueError) as error:
        layers_option("1;3")
    assert str(error.value) == (
        "pp_media: layers_per_stage '1;3' is neither 'auto' nor comma-separated integers; pass "
        "e.g. layers_per_stage='1,3', [1, 3] or 'auto'."
    )
    for bad in (3, [1.5, 2.5], [True, 3]):
        with pytest.raises(TypeError, match="pp_media: layers_per_stage must be a sequence"):
            layers_option(bad)


def test_flop_model_counts_parameters_tokens_and_patches() -> None:
    """On a meta-device tiny Qwen2-VL: 6 x parameters x tokens (or patches) plus attention."""
    transformers = pytest.importorskip("transformers")
    from pp_media._hf.families import adapter_for
    from pp_media._hf.stage_costs import flop_stage_costs
    from pp_media.testing import tiny_config

    config = tiny_config("qwen2_vl")
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    costs = flop_stage_costs(model, adapter_for(config), config)
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    text, tokens = config.text_config, 1024
    assert costs.layer == 3 * (2 * layer * tokens + 4 * tokens**2 * text.hidden_size)
    vision_attention = 4 * 1024**2 * config.vision_config.embed_dim * config.vision_config.depth
    assert costs.first == 3 * (2 * vision * 1024 + vision_attention)
    assert costs.last == 3 * 2 * text.hidden_size * text.vocab_size * tokens
    assert costs.unit == "flop" and costs.source == "FLOP model of the default workload"


def test_choose_layout_takes_strings_and_refuses_a_batch_it_would_not_use() -> None:
    transformers = pytest.importorskip("transformers")
    from pp_media._hf.auto_split import choose_layout
    from pp_media._hf.families import adapter_for
    from pp_media.testing import tiny_config

    config = tiny_config("qwen2_vl")
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    common = {"n_microbatches": 4, "group": None, "device": "cpu", "dtype": None}
    adapter = adapter_for(config)
    layout = choose_layout(
        model, adapter, config, "1F1B", 2, None, "1,3", sample_batch=None, **common
    )
    assert layout.layers == ((0,), (1, 2, 3)) and layout.costs is None
    # Without a batch, "auto" uses the FLOP model and needs no process group.
    auto = choose_layout(
        model, adapter, config, "1F1B", 2, None, "auto", sample_batch=None, **common
    )
    assert auto.costs.parts.unit == "flop"
    assert auto.layers_per_stage == auto_layers_per_stage(auto.costs.parts, 4, 2, auto.rank_of, 2)
    assert auto.costs == estimate(auto.costs.parts, auto.layers_per_stage, auto.rank_of, 2)
    with pytest.raises(ValueError) as error:
        choose_layout(
            model, adapter, config, "1F1B", 2, None, "1,3", sample_batch={"input_ids": 0}, **common
        )
    assert str(error.value) == (
        "pp_media: sample_batch is only used by layers_per_stage='auto' (to measure the parts' "
        "costs); got layers_per_stage='1,3'. Drop one of them."
    )
