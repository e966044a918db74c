"""Data parallel x pipeline parallel: DP=2 x PP=2 on 4 gloo ranks equals the unsplit model.

Every case builds the same tiny random VLM on all 4 ranks (fp32, dropout 0, train mode); a deep
copy runs the *global* batch (replica 0's 6 samples, then replica 1's) as the reference. The mesh
is ``(dp=2, pp=2)``: ranks 0, 1 run replica 0's pipeline and ranks 2, 3 replica 1's, each on its
own batch (6 samples in 4 microbatches; sample 0 text-only, 0..3 images per sample, other
images and texts on each replica). The loss on the last stage's ranks, every parameter's
gradient (gathered from the FSDP shards by the unsplit model's names) and the parameters after
SGD steps must equal the reference's.

Cases (one spawn; ``dp_parity_worker.py``): Qwen2-VL under 1F1B (3 SGD steps, ``dp_size=2``) and
Interleaved1F1B (3 steps, an explicit ``DeviceMesh``; pytorch #164756 reports FSDP trouble
there), FSDP; PaliGemma with tied embeddings under 1F1B (embedding and LM head on different
ranks) and ZBVZeroBubble (both on one rank: two FSDP copies), 3 steps each; Qwen2-VL with
``data_parallel="replicate"`` (1 step); a 4-rank pipeline without DP (tied PaliGemma, for
``clip_grad_norm_`` without DP). Where marked, ``pipe.clip_grad_norm_`` runs before each
optimizer step with half the reference's norm as ``max_norm`` and must return the norm that
``torch.nn.utils.clip_grad_norm_`` returns on the unsplit model and leave the same gradients.

Negative control: the replicas' batches share a layout (placeholders, grids) but not their
pixels or text, and the pipelines swap their pixels: every check passes, and the gradients
miss the reference by orders of magnitude, so a DP x PP that routed one replica's media to
the other would fail here. bf16: ``mixed_precision="bf16"`` (bf16 compute, fp32 parameters
and gradient reduction) on the same batch for 3 SGD steps (lr 0.2): the loss falls every
step and stays within ``BF16_LOSS_TOLERANCE`` of the fp32 reference, the parameters within
``BF16_PARAM_TOLERANCE``. Also: ``pipe.replica_sampler`` (same samples on the ranks of a
pipeline, disjoint across replicas), a bad batch on replica 1 only (every rank raises the same
``ValueError`` before any compute, instead of hanging), ranks of one pipeline with different
batches, and refused option combinations.

Tolerances (fp32, absolute), as in the 2-rank parity tests: loss 5e-6, gradients and
parameters 1e-6; the norm 1e-5 relative (torch's fp32 norm of a shard rounds differently from
the whole tensor's). Measured on torch 2.13 CPU (``pytest -s`` prints them):

=================================  =========  =========  ==========  ==========  ============
case                               loss       gradient   parameter   norm (rel)  clipped grad
=================================  =========  =========  ==========  ==========  ============
Qwen2-VL 1F1B FSDP, 3 steps        4.8e-7     4.8e-8     6.0e-8      3.1e-7      3.7e-8
Qwen2-VL Interleaved1F1B FSDP      4.8e-7     7.6e-8     1.2e-7
PaliGemma tied 1F1B FSDP           0          4.4e-8     8.0e-8      4.0e-6      1.3e-7
PaliGemma tied ZBVZeroBubble FSDP  0          4.4e-8     8.0e-8      4.0e-6      1.3e-7
Qwen2-VL 1F1B replicate           4.8e-7     2.2e-8     7.5e-9      7.8e-8      1.1e-8
PaliGemma tied, PP=4 without DP    0          1.1e-8     3.0e-8      1.0e-7      7.5e-9
swapped media (must fail)          1.2e-3     4.1e-2     2.0e-2
bf16, 3 steps                      2.1e-4                4.1e-4
=================================  =========  =========  ==========  ==========  ============
"""

from __future__ import annotations

import itertools
from typing import Any

import dp_parity_worker as w
import pytest

from tests.helpers.ranks import case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-6
NORM_RELATIVE_TOLERANCE = 1e-5
#: bf16 keeps about 3 significant digits: the losses near 6.9 may differ by a few 1e-3.
BF16_LOSS_TOLERANCE = 1e-2
BF16_PARAM_TOLERANCE = 1e-2
#: The swapped-media control must miss the gradients by at least this (1000x the tolerance).
CONTROL_MIN_GRAD_ERROR = 1e-3
PARITY_CASES = [case for case in w.cases() if not (case.swap_media or case.bf16)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dp_parity")
    return spawn_ranks(
        w.worker, out, world_size=w.WORLD_SIZE, timeout_s=500, what="the DP x PP parity run"
    )


def _maxima(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    steps = [step for result in per_rank for step in result["steps"]]
    found = {
        "loss": max(abs(step["loss"] - step["ref_loss"]) for step in steps if "loss" in step),
        "grad": max(step["grad"]["err"] for step in steps),
        "param": max(step["param"]["err"] for step in steps),
    }
    if "norm" in steps[0]:
        found["norm"] = max(abs(s["norm"] - s["ref_norm"]) / s["ref_norm"] for s in steps)
        found["clipped"] = max(step["clipped_grad"]["err"] for step in steps)
    return found


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda case: case.key)
def test_dp_x_pp_equals_the_unsplit_model_on_the_global_batch(
    results: list[dict[str, Any]], case: w.Case
) -> None:
    per_rank = case_results(results, case.key)
    found = _maxima(per_rank)
    print(f"\n{case.key}: " + ", ".join(f"{k} {v:.2g}" for k, v in found.items()))
    assert found["loss"] <= LOSS_TOLERANCE
    assert found["grad"] <= GRAD_TOLERANCE
    assert found["param"] <= PARAM_TOLERANCE
    for rank, result in enumerate(per_rank):
        for step in result["steps"]:
            assert step["grad"]["missing"] == [], f"rank {rank}"
            # Losses are returned on the last stage's ranks only (one per replica with DP).
            assert ("loss" in step) == result["has_last_stage"], f"rank {rank}"
        assert result["steps"][0]["grad"]["scale"] > 100 * GRAD_TOLERANCE
    if case.clip:
        assert found["norm"] <= NORM_RELATIVE_TOLERANCE
        assert found["clipped"] <= GRAD_TOLERANCE


@pytest.mark.parametrize("case", [c for c in PARITY_CASES if c.data_parallel != "none"])
def test_the_mesh_puts_pipelines_on_consecutive_ranks_and_shards_over_dp(
    results: list[dict[str, Any]], case: w.Case
) -> None:
    per_rank = case_results(results, case.key)
    assert [result["pp_ranks"] for result in per_rank] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [result["dp_ranks"] for result in per_rank] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [result["dp_rank"] for result in per_rank] == [0, 0, 1, 1]
    assert all(result["mesh"] == [[0, 1], [2, 3]] for result in per_rank)
    assert all(result["sharded"] for result in per_rank)
    for result in per_rank:
        if case.data_parallel == "fsdp":  # each dp rank holds about half of its stages
            assert result["local_numel"] <= result["stage_numel"] // 2 + 64
        else:
            assert result["local_numel"] == result["stage_numel"]
    # Each pipeline's ranks hold every parameter of the model between them.
    for replica in (per_rank[:2], per_rank[2:]):
        held = {name for result in replica for name in result["names"]}
        assert held == set(per_rank[0]["names"]) | set(per_rank[1]["names"])


def test_without_dp_the_pipeline_spans_the_world(results: list[dict[str, Any]]) -> None:
    per_rank = case_results(results, "paligemma/1F1B/pp4/tied")
    assert [result["stages"] for result in per_rank] == [[0], [1], [2], [3]]
    assert all(r["mesh"] is None and r["dp_ranks"] is None for r in per_rank)
    assert all(r["dp_rank"] == 0 and r["dp_size"] == 1 for r in per_rank)
    assert not any(result["sharded"] for result in per_rank)


def test_a_replica_computing_with_the_other_replicas_media_fails_parity(
    results: list[dict[str, Any]],
) -> None:
    found = _maxima(case_results(results, "qwen2_vl/1F1B/fsdp/swap_media"))
    print(f"\nswapped media: grad {found['grad']:.2g}, loss {found['loss']:.2g}")
    assert found["grad"] >= CONTROL_MIN_GRAD_ERROR
    assert found["loss"] > LOSS_TOLERANCE


def test_bf16_mixed_precision_trains_near_the_fp32_run(results: list[dict[str, Any]]) -> None:
    per_rank = case_results(results, "qwen2_vl/1F1B/fsdp/bf16")
    found = _maxima(per_rank)
    print(f"\nbf16: loss {found['loss']:.2g}, param {found['param']:.2g}")
    losses = [step["loss"] for step in per_rank[1]["steps"]]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < losses[0] - 0.05
    assert found["loss"] <= BF16_LOSS_TOLERANCE
    assert found["param"] <= BF16_PARAM_TOLERANCE
    # Not fp32 by accident: bf16 compute moves the loss by more than fp32 round-off.
    assert found["loss"] > LOSS_TOLERANCE


def test_replica_sampler_gives_each_pipeline_its_own_share(
    results: list[dict[str, Any]],
) -> None:
    per_rank = case_results(results, "sampler")
    assert per_rank[0]["epochs"] == per_rank[1]["epochs"]
    assert per_rank[2]["epochs"] == per_rank[3]["epochs"]
    for epoch in range(2):
        first = [i for batch in per_rank[0]["epochs"][epoch] for i in batch]
        second = [i for batch in per_rank[2]["epochs"][epoch] for i in batch]
        assert sorted(first + second) == list(range(40))
    assert per_rank[0]["epochs"][0] != per_rank[0]["epochs"][1]  # set_epoch reshuffles


def test_a_bad_batch_on_one_replica_raises_the_same_error_on_every_rank(
    results: list[dict[str, Any]],
) -> None:
    messages = [result["error_message"] for result in case_results(results, "bad_batch")]
    assert len(set(messages)) == 1
    message = messages[0]
    assert message is not None
    assert message.startswith(
        "pp_media: the batch of data-parallel replica 1 (ranks [2, 3]) failed its check, so "
        "no rank starts this step: microbatch 0, sample 0 of the batch: "
    )
    assert "image placeholder tokens (id 990) in input_ids are not whole images" in message


def test_ranks_of_one_pipeline_with_different_batches_raise_everywhere(
    results: list[dict[str, Any]],
) -> None:
    messages = [r["error_message"] for r in case_results(results, "mismatched_pipeline")]
    assert len(set(messages)) == 1
    assert messages[0] is not None
    assert messages[0].startswith(
        "pp_media: the ranks of data-parallel replica 1's pipeline got different batches"
    )
    assert "pipe.replica_sampler(dataset)" in messages[0]


def test_refused_option_combinations_say_what_to_do(results: list[dict[str, Any]]) -> None:
    messages = case_results(results, "option_errors")[0]["messages"]
    assert messages["group_and_dp_size"].startswith(
        "pp_media: pass at most one of group, mesh and dp_size; got group, dp_size."
    )
    assert messages["dp_size_not_dividing"].startswith(
        "pp_media: dp_size 3 does not divide the world of 4 ranks"
    )
    assert messages["one_dim_mesh"].startswith(
        "pp_media: mesh must be a 2-D DeviceMesh with dims ('dp', 'pp'); got 1 dims named ('dp',)."
    )
    assert messages["unknown_mode"].startswith("pp_media: data_parallel='ddp'; choose 'fsdp'")
    assert messages["bf16_without_dp"].startswith(
        "pp_media: mixed_precision needs the FSDP wrapping of data parallelism; pass dp_size"
    )
    assert messages["fp16"].startswith(
        "pp_media: mixed_precision=torch.float16 is not supported; use 'bf16'"
    )
