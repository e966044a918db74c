"""``pipe.eval_step``: the loss of a batch without a backward pass, on every torch schedule.

The worker (``hf_eval_worker.py``) runs every case on 2 gloo ranks in one process group: an
evaluation before any training step, a training step, an evaluation between training steps and
a training step after it, each beside the unsplit reference (see its docstring). Tolerances are
the parity tests' (fp32 summation order): loss 5e-6, gradients 1e-6 absolute.
"""

from __future__ import annotations

from typing import Any

import hf_eval_worker as worker_module
import pytest

from tests.helpers.ranks import case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
#: bf16 stages against the fp32 reference: about 3 significant digits (the demo's tolerance).
BF16_LOSS_TOLERANCE = 5e-2
#: Attention dropout must move the reference's loss by at least this factor x tolerance.
DROPOUT_FACTOR = 100
TIMEOUT_S = 240
EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"

CASES = worker_module.cases()
EVALUATED = [case for case in CASES if case.evaluates]
REFUSED = [case for case in CASES if not case.evaluates and not case.tied]
TRAINING = [case for case in CASES if case.trains]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(
        worker_module.worker,
        tmp_path_factory.mktemp("hf_eval"),
        world_size=worker_module.WORLD_SIZE,
        timeout_s=TIMEOUT_S,
        what="the distributed eval_step run",
    )


def _last(per_rank: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The rank holding the last stage and its result; the loss is returned there only."""
    (rank,) = [r for r, result in enumerate(per_rank) if result["has_last_stage"]]
    for other, result in enumerate(per_rank):
        assert result["last_stage_rank"] == rank, f"rank {other}: last_stage_rank"
        assert (result["eval_first"] is not None) == (other == rank)
    return rank, per_rank[rank]


@pytest.mark.parametrize("case", EVALUATED, ids=[case.key for case in EVALUATED])
def test_eval_step_loss_equals_the_unsplit_model_under_no_grad(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    rank, last = _last(per_rank)
    assert rank == 1
    tolerance = BF16_LOSS_TOLERANCE if case.dtype else LOSS_TOLERANCE
    assert abs(last["eval_first"] - last["ref_eval"]) <= tolerance
    for result in per_rank:
        assert result["broadcast"] == pytest.approx(last["eval_first"], abs=0)
        assert result["no_grads_after_eval"], "eval_step created gradients"
        assert result["train_mode_after_eval"], "eval_step left a module in eval mode"
        assert result["reference_has_mm_token_type_ids"]
        assert result["pairs_is_iterator"]
    if case.dtype:
        assert all(result["dtypes"] == ["torch.bfloat16"] for result in per_rank)


@pytest.mark.parametrize("case", REFUSED, ids=[case.key for case in REFUSED])
def test_v_schedules_are_refused_on_every_rank_before_any_communication(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """torch 2.13's ``schedule.eval`` fails on V schedules (checked: AssertionError in
    ``get_local_bwd_output``, and the peer then waits); every rank refuses alike instead."""
    for rank, result in enumerate(case_results(results, case.key)):
        assert result["last_stage_rank"] == 0, "V schedules run the last stage on rank 0"
        assert result["refused"] == (
            f"pp_media: eval_step cannot run the V-shaped schedule {case.schedule}: torch "
            "2.13's forward-only schedule.eval fails there (its two adjacent stages on one rank "
            "hand gradients over locally, and PipelineStage.get_local_bwd_output asserts a "
            "backward). Evaluate with a pipeline built with GPipe, 1F1B, Interleaved1F1B, "
            "LoopedBFS or InterleavedZeroBubble."
        ), f"rank {rank}"
        assert result["no_grads_after_eval"]


@pytest.mark.parametrize("case", TRAINING, ids=[case.key for case in TRAINING])
def test_training_around_eval_steps_keeps_parity_and_eval_touches_no_gradient(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    _, last = _last(per_rank)
    assert abs(last["train"]["loss"] - last["train"]["ref_loss"]) <= LOSS_TOLERANCE
    assert abs(last["eval_again"] - last["ref_eval"]) <= LOSS_TOLERANCE
    assert abs(last["train_again"]["loss"] - last["train"]["ref_loss"]) <= LOSS_TOLERANCE
    for rank, result in enumerate(per_rank):
        for step in ("train", "train_again"):
            record = result[step]
            assert record["grad_err"] <= GRAD_TOLERANCE, (
                f"rank {rank}, {step}: {record['grad_err']:.3e} at {record['grad_worst']}"
            )
        assert result["grads_unchanged"], f"rank {rank}: eval_step changed a gradient"
        assert result["train_mode_again"], f"rank {rank}: eval_step left a module in eval mode"


def test_eval_runs_in_eval_mode_and_keeps_a_pipeline_in_eval_mode(
    results: list[dict[str, Any]],
) -> None:
    per_rank = case_results(results, "1F1B/dropout")
    _, last = _last(per_rank)
    # The data exercise dropout: train mode would be far off the eval-mode reference.
    assert abs(last["ref_train_mode_loss"] - last["ref_eval"]) > DROPOUT_FACTOR * LOSS_TOLERANCE
    assert abs(last["eval_first"] - last["ref_eval"]) <= LOSS_TOLERANCE
    assert all(result["eval_mode_kept"] for result in per_rank)


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_named_parameters_yields_pairs_and_which_rank_holds_the_tied_names(
    results: list[dict[str, Any]], schedule: str
) -> None:
    """Split over two ranks, each holds one copy under its own name; on one rank (V
    schedules) the one shared parameter is yielded once, as the embedding, unless
    ``remove_duplicate=False``."""
    per_rank = case_results(results, f"{schedule}/tied")
    names = [result["names"] for result in per_rank]
    for result in per_rank:
        assert len(result["names"]) == len(set(result["names"]))
    if schedule == "1F1B":
        assert EMBED in names[0] and HEAD not in names[0]
        assert HEAD in names[1] and EMBED not in names[1]
        assert [sorted(n) for n in names] == [r["names_all"] for r in per_rank]
    else:
        assert EMBED in names[0] and HEAD not in names[0]
        assert EMBED in per_rank[0]["names_all"] and HEAD in per_rank[0]["names_all"]
        assert sorted(names[0]) == sorted(set(per_rank[0]["names_all"]) - {HEAD})
