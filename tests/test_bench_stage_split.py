"""The pure parts of ``benchmarks/bench_stage_split.py``: the FLOP arithmetic from the configs,
the scaled model keeping the real cost ratios, the batches it times, and the split table
against a brute force over every split. No timings."""

from __future__ import annotations

import pytest

from pp_media._hf.auto_split import estimate
from tests.helpers.benchmarks import loaded_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from loaded_benchmark("bench_stage_split")


def test_flops_by_hand(bench) -> None:
    text = bench.Text(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=100)
    # q, o: 8x8 each; k, v: 8x4 each; MLP: 3 x 8x16; 2 FLOPs per multiply-add; attention 4*T*H.
    assert bench.layer_flops(text, 10) == 2 * (64 + 64 + 32 + 32 + 3 * 128) + 4 * 10 * 8
    assert bench.head_flops(text) == 2 * 8 * 100
    vision = bench.Vision(2, 4, 8, 2, None, 2, 6, patch_input=12, merge=2)
    block = 4 * 16 + 2 * 4 * 8
    merger = 16 * 16 + 16 * 6
    expected = 2 * 8 * (12 * 4 + 2 * block) + 8 * 4 * 4 * 2 * 8 + 2 * (8 / 4) * merger
    assert bench.vision_flops(vision, 8) == expected


def test_windowed_blocks_attend_their_window(bench) -> None:
    full = bench.Vision(4, 8, 8, 3, None, 4, 8)
    windowed = bench.Vision(4, 8, 8, 3, 16, 1, 8)
    # 3 of 4 blocks attend 16 patches instead of 256: 3 x 4 x 8 x (256 - 16) per patch.
    assert bench.vision_flops(full, 256) - bench.vision_flops(windowed, 256) == 256 * (
        3 * 4 * 8 * (256 - 16)
    )


def test_the_scaled_model_keeps_the_7b_cost_ratios(bench) -> None:
    vision, text = bench.scaled_shapes(*bench.QWEN25_VL["7B"])
    assert text.layers == 28
    for name, scaled in bench.workloads(
        bench.SCALED_IMAGE, bench.REAL_TOKENS // bench.SCALE
    ).items():
        real = bench.workloads(bench.REAL_IMAGE, bench.REAL_TOKENS)[name]
        mine = bench.part_costs(vision, text, scaled)
        theirs = bench.part_costs(*bench.QWEN25_VL["7B"], real)
        assert mine.first / mine.layer == pytest.approx(theirs.first / theirs.layer, rel=0.02)
        assert mine.last / mine.layer == pytest.approx(theirs.last / theirs.layer, rel=0.02)


def test_the_timed_batches_fit_the_model(bench) -> None:
    pytest.importorskip("transformers")
    from pp_media._hf.batch import prepare_step_inputs
    from pp_media._hf.families import adapter_for

    config = bench.scaled_config(*bench.scaled_shapes(*bench.QWEN25_VL["7B"]))
    for workload in bench.workloads(bench.SCALED_IMAGE, bench.REAL_TOKENS // bench.SCALE).values():
        batch = bench.make_batch(config, workload)
        assert batch["input_ids"].shape == (bench.BATCH, bench.REAL_TOKENS // bench.SCALE)
        images = sum(len(sample) for sample in workload.images)
        assert batch["image_grid_thw"].shape == (images, 3)
        inputs = prepare_step_inputs(batch, adapter_for(config), config, bench.MICROBATCHES)
        assert inputs.input_ids.shape == batch["input_ids"].shape


@pytest.mark.parametrize("model", ["7B", "32B", "72B"])
@pytest.mark.parametrize("n_stages", [2, 4])
def test_split_table_against_brute_force(bench, model: str, n_stages: int) -> None:
    vision, text = bench.QWEN25_VL[model]
    parts = bench.part_costs(vision, text, bench.workloads(bench.REAL_IMAGE, 576)["image_heavy"])
    split = bench.split_costs(parts, text.layers, n_stages)
    assert split["even"] == tuple(bench.balanced_layers(text.layers, n_stages))
    assert split["ideal"] == pytest.approx(
        (parts.first + parts.last + text.layers * parts.layer) / n_stages
    )
    if n_stages == 2:
        best = min(
            estimate(parts, (n, text.layers - n), lambda s: s, 2).bottleneck
            for n in range(text.layers + 1)
        )
        assert split["auto_cost"] == pytest.approx(best)
    assert split["auto_cost"] <= split["even_cost"]
    assert split["auto_cost"] >= split["ideal"]


def test_one_f_one_b_model(bench) -> None:
    # Two stages, 4 microbatches: fill and drain 1 + 2 per microbatch, steady 3 x 2.
    assert bench.one_f_one_b_time([4.0, 8.0], 4) == pytest.approx(1 + 2 + 3 * 2)
