"""The automatic split, and stage 0 without decoder layers, change nothing numerically.

On 2 gloo ranks (one spawn for all cases, ``auto_split_worker.py``): tiny Qwen2-VL and Qwen3-VL
(deepstack features cross the stage boundaries), 6 samples in 4 microbatches, images 0..3 per
sample. ``layers_per_stage="auto"`` from costs measured on the step's batch (1F1B) and from the
FLOP model (Interleaved1F1B, ZBVZeroBubble: the vision tower outweighs a decoder layer, so the
FLOP model gives stage 0 no decoder layer at all), and ``"0,4"`` given as a string (1F1B, stage
0 with only the embeddings and the vision tower). Loss and every gradient equal the unsplit
model's within the project's fp32 tolerances (summation order only); both ranks build the same
split, and the layout's estimate is the one the split search gives for its costs.
"""

from __future__ import annotations

from typing import Any

import auto_split_worker as worker_module
import pytest

from pp_media._hf.auto_split import StageCosts, auto_layers_per_stage
from pp_media._hf.partition import plan_stages
from tests.helpers.parity import loss_errors
from tests.helpers.ranks import case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
TIMEOUT_S = 240
N_LAYERS = 4
CASES = worker_module.CASES
AUTO = [case for case in CASES if case.layers_per_stage == "auto"]
FLOP_MODEL = [case for case in AUTO if not case.measure]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(
        worker_module.worker,
        tmp_path_factory.mktemp("auto_split"),
        world_size=worker_module.WORLD_SIZE,
        timeout_s=TIMEOUT_S,
        what="the automatic-split parity run",
    )


@pytest.mark.parametrize("case", CASES, ids=[case.key for case in CASES])
def test_loss_and_every_gradient_match_the_unsplit_model(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    (error,) = loss_errors(per_rank)
    assert error <= LOSS_TOLERANCE, f"|loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        (record,) = result["steps"]
        assert record["grad_err"] <= GRAD_TOLERANCE, (
            f"rank {rank}: max |grad - reference| = {record['grad_err']:.3e} at "
            f"{record['grad_worst']}"
        )
        assert not record["missing_grads"], (
            f"rank {rank}: no gradient for {record['missing_grads']}"
        )
        assert record["batch_unchanged"], f"rank {rank}: step() modified the caller's batch"


@pytest.mark.parametrize("case", CASES, ids=[case.key for case in CASES])
def test_every_rank_builds_the_same_split(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    splits = [result["layers_per_stage"] for result in per_rank]
    assert splits[0] == splits[1], f"ranks disagree: {splits}"
    assert sum(splits[0]) == N_LAYERS
    if case.layers_per_stage != "auto":
        assert splits[0] == [int(n) for n in case.layers_per_stage.split(",")]
        assert all(result["costs"] is None for result in per_rank)
    else:
        assert per_rank[0]["costs"] == per_rank[1]["costs"], "ranks hold different estimates"


@pytest.mark.parametrize("case", AUTO, ids=[case.key for case in AUTO])
def test_the_split_is_the_search_result_for_the_recorded_costs(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    result = case_results(results, case.key)[0]
    costs = StageCosts(**result["costs"]["parts"])
    layout = plan_stages(case.schedule, worker_module.WORLD_SIZE, N_LAYERS)
    expected = auto_layers_per_stage(
        costs, N_LAYERS, layout.n_stages, layout.rank_of, worker_module.WORLD_SIZE
    )
    assert result["layers_per_stage"] == list(expected)
    assert costs.unit == ("seconds" if case.measure else "flop")
    stage_costs = [
        costs.stage_cost(s, layout.n_stages, n) for s, n in enumerate(result["layers_per_stage"])
    ]
    assert result["costs"]["stages"] == pytest.approx(stage_costs)


@pytest.mark.parametrize("case", FLOP_MODEL, ids=[case.key for case in FLOP_MODEL])
def test_the_flop_model_gives_stage_0_no_decoder_layer(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """The tiny models' vision tower outweighs a decoder layer in the FLOP model's default
    workload, so with two stages per rank stage 0 keeps only the embeddings and the tower."""
    (result, _) = case_results(results, case.key)
    assert result["layers_per_stage"][0] == 0, result["layers_per_stage"]
