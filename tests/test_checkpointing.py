"""Training checkpoints that resume, Hugging Face export, activation checkpointing: 4 gloo ranks.

``checkpoint_worker.py`` runs in two spawns of 4 ranks. The first trains a tiny tied Qwen2-VL DP=2
x PP=2 (FSDP2, 1F1B; each replica 6 samples of its own in 4 microbatches, images and text-only
samples; AdamW lr 1e-2) for 4 steps without a break, saving ``pipe.save_checkpoint`` after step 2;
exports the trained model with ``pipe.save_pretrained`` (one file, and sharded with an index); and
runs one step of a plain and of an activation-checkpointed pipeline of the same model (1F1B and
Interleaved1F1B, stage 0 with the vision tower; the zero-bubble schedules are refused, see
``_hf/activation.py``). The second spawn, in new processes, builds DP=2 x PP=2 from a differently
initialised model, loads the checkpoint and runs steps 3 and 4; loads it into one 4-stage pipeline
without data parallelism (another dp size and split) and into ZBVZeroBubble (both tied copies on
one rank); checks the errors of wrong checkpoints; and round-trips the export of Qwen2-VL
(tied), LLaVA, Gemma3 (tied), Mistral3 and GLM-4V through ``from_pretrained``.

Measured (torch 2.13 CPU, fp32): resumed losses and parameters equal the uninterrupted run's
bit for bit (0.0); the other layouts load the same values bit for bit, and the 4-stage
pipeline's two steps differ from the uninterrupted ones by summation order only; the reloaded
export's logits equal the pipeline's (0.0 measured); activation checkpointing leaves loss and
gradients bit for bit equal and saves fewer bytes for backward. The test asserts exact equality
where the computation is the same (resume, load, activation checkpointing), 1e-5 for the
export's logits (the same weights and per-sample forward, only the batch split differs) and the
fp32 loss tolerance of the parity tests (5e-6) where the layout changes the summation order.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoint_worker import (
    AC_SCHEDULES,
    EXPORT_FAMILIES,
    SAVE_AFTER,
    STEPS,
    WORLD_SIZE,
    first_worker,
    second_worker,
)
from tests.helpers.ranks import Result, case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Result]]]:
    root = tmp_path_factory.mktemp("checkpointing")
    (root / "first").mkdir()
    (root / "second").mkdir()
    first = spawn_ranks(
        first_worker, root / "first", world_size=WORLD_SIZE, timeout_s=600, what="the first run"
    )
    second = spawn_ranks(
        second_worker, root / "second", world_size=WORLD_SIZE, timeout_s=600, what="the resumed run"
    )
    return {"first": first, "second": second}


def _case(runs: dict[str, Any], spawn: str, key: str) -> list[Result]:
    return case_results(runs[spawn], key)


def _last(per_rank: list[Result]) -> Result:
    """The result of replica 0's last-stage rank; every replica's last-stage rank reports the
    same (global) losses."""
    holders = [result for result in per_rank if result["has_last_stage"]]
    assert holders
    for holder in holders:
        assert holder.get("losses") == holders[0].get("losses")
    return holders[0]


def test_resume_equals_uninterrupted_training(runs: dict[str, Any]) -> None:
    uninterrupted = _case(runs, "first", "resume/uninterrupted")
    resumed = _case(runs, "second", "resume/continue")
    for result in resumed:
        assert result["step"] == SAVE_AFTER
        assert result["names_match"]
        assert result["loaded_diff"] == 0.0, "loading restores the saved values exactly"
        assert result["final_diff"] == 0.0, "AdamW state restored: same parameters after resume"
    full_losses = _last(uninterrupted)["losses"]
    assert len(full_losses) == STEPS
    assert _last(resumed)["losses"] == full_losses[SAVE_AFTER:]


def test_checkpoint_loads_into_another_dp_size_and_split(runs: dict[str, Any]) -> None:
    other = _case(runs, "second", "resume/other_layout")
    assert sorted(s for result in other for s in result["stages"]) == [0, 1, 2, 3]
    for result in other:
        assert result["dp_size"] == 1
        assert result["step"] == SAVE_AFTER
        assert result["loaded_diff"] == 0.0
    full_losses = _last(_case(runs, "first", "resume/uninterrupted"))["losses"]
    for got, want in zip(_last(other)["losses"], full_losses[SAVE_AFTER:], strict=True):
        assert abs(got - want) <= LOSS_TOLERANCE


def test_checkpoint_loads_both_tied_copies_on_one_rank(runs: dict[str, Any]) -> None:
    per_rank = _case(runs, "second", "resume/v_schedule")
    assert any(0 in r["stages"] and 3 in r["stages"] and r["holds_head"] for r in per_rank)
    for result in per_rank:
        assert result["step"] == SAVE_AFTER
        assert result["loaded_diff"] == 0.0


def test_wrong_checkpoints_are_refused_clearly(runs: dict[str, Any]) -> None:
    for result in _case(runs, "second", "resume/errors"):
        messages = result["messages"]
        assert messages["other_model"].startswith("pp_media: ")
        assert "does not fit this model" in messages["other_model"]
        assert "keys missing" in messages["other_model"]
        assert "holds no optimizer state" in messages["no_optimizer_state"]
        assert (
            "is not a checkpoint written by pipe.save_checkpoint" in (messages["not_a_checkpoint"])
        )
        assert result["step_without_optimizer"] == 3
        assert messages["zero_bubble_checkpointing"] == (
            "pp_media: activation_checkpointing=True does not work with schedule "
            "ScheduleZBVZeroBubble: its backward runs in two passes (input, then weight "
            "gradients) and torch's checkpoint recomputes a layer only once. Use GPipe, 1F1B, "
            "Interleaved1F1B or LoopedBFS, or build without activation_checkpointing."
        )


@pytest.mark.parametrize("label", ["hf", "hf_sharded"])
def test_export_reloads_with_the_pipelines_logits(runs: dict[str, Any], label: str) -> None:
    holders = [r for r in _case(runs, "first", "export/trained") if r["has_last_stage"]]
    assert sorted(r["dp_rank"] for r in holders) == [0, 1]
    for holder in holders:
        _check_export(holder[label], label)


def _check_export(exported: dict[str, Any], label: str) -> None:
    assert exported["class"] == "Qwen2VLForConditionalGeneration"
    assert exported["loading_info"] == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert exported["logits_scale"] > 0.1
    # Measured 0.0: the same weights and per-sample forward; only the batch split differs.
    assert exported["logits_diff"] <= 1e-5
    assert exported["tied_after_load"], "tied embeddings stay tied after from_pretrained"
    assert not any(key.startswith("lm_head") for key in exported["keys"]), "tied: written once"
    weights = [name for name in exported["files"] if name.endswith(".safetensors")]
    if label == "hf":
        assert weights == ["model.safetensors"]
    else:
        assert len(weights) > 2
        assert "model.safetensors.index.json" in exported["files"]


@pytest.mark.parametrize("model_type", [family for family, _ in EXPORT_FAMILIES])
def test_export_round_trips_each_family(runs: dict[str, Any], model_type: str) -> None:
    result = _case(runs, "second", "export/families")[0][model_type]
    assert result["class"] == result["source_class"]
    assert result["loading_info"]["missing_keys"] == []
    assert result["loading_info"]["unexpected_keys"] == []
    assert result["same_names"]
    assert result["max_diff"] == 0.0
    assert result["keys_equal"], "the same file keys as transformers' own save_pretrained"


@pytest.mark.parametrize("schedule", AC_SCHEDULES)
def test_activation_checkpointing_changes_nothing_but_memory(
    runs: dict[str, Any], schedule: str
) -> None:
    per_rank = _case(runs, "first", f"activation/{schedule}")
    assert any(result["has_vision"] for result in per_rank), "stage 0 with the vision tower"
    losses = [(r["loss"], r["loss_checkpointed"]) for r in per_rank if r["loss"] is not None]
    assert all(plain == checkpointed for plain, checkpointed in losses)
    assert len(losses) == 2, "one last stage per replica"
    for result in per_rank:
        assert result["names_equal"]
        assert result["missing_grads"] == []
        assert result["grad_diff"] == 0.0
        assert result["saved_bytes_checkpointed"] < result["saved_bytes"]
