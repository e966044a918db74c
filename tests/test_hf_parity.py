"""Hugging Face stage splitting: a pipelined step equals the unsplit model's, on 2 gloo ranks.

Every case builds the same tiny random VLM on both ranks (``tiny_config``, fp32, dropout 0,
train mode); a deep copy (or ``from_pretrained`` of the same checkpoint directory) is the
reference, run on the whole batch with the batch's own ``labels``. The pipeline from
``build_vlm_pipeline`` then runs one step of that batch (6 samples in 4 microbatches: not
divisible; text-only samples and a whole text-only microbatch included) and must give the
reference's loss on the last stage's rank and the reference's gradient for *every* parameter
each rank holds, compared by the unsplit model's parameter names. No batch carries
``n_images_per_sample`` / ``n_videos_per_sample``: the pipeline derives the counts from the
placeholder tokens (and, in one case, ``mm_token_type_ids`` too).

Cases (the worker, ``hf_parity_worker.py``, runs them all in one 2-rank process group): Qwen2-VL
under all 7 torch schedules; Qwen2-VL and Qwen2.5-VL with images and videos in one batch;
microbatches with videos but no images, with derived ``mm_token_type_ids`` too; LLaVA with
0..3 images per sample (rows per image) and with exactly one image per sample
(``pixel_values [B, C, H, W]``); an all-text batch; explicit ``layers_per_stage`` (uneven, and
stages without decoder layers at both ends); tied embeddings with stage 0 and the last
stage on different ranks (1F1B, gradients all-reduced) and on one rank (ZBVZeroBubble, one
shared Parameter), each through 3 SGD steps; building from a ``save_pretrained`` directory
(untied and tied). A last case swaps the pixels of two equal-grid images of different samples
in the pipeline's batch only, and must fail the parity check by orders of magnitude: proof
that the checks can fail.

Tolerances, absolute, fp32: loss 5e-6, gradients 1e-6, parameters after SGD 1e-6. The pipeline
computes the same token losses and the same per-sample forward, but sums in another order: the
loss is a sum per microbatch divided by the whole batch's label tokens, then a sum across
microbatches; each stage's gradients accumulate over microbatches instead of coming from one
backward over the whole batch, and the rank-to-rank hops do not change values. That reorders
fp32 additions and leaves a few ulps: the loss is about 6.9 (ulp 4.8e-7). Measured on torch
2.13 CPU, transformers 5.24, the largest differences over all cases are 9.5e-7 for the loss
(2 ulps), 8.9e-8 for any gradient entry (gradients up to 1.3 in magnitude) and 6.0e-8 for any
parameter after 3 SGD steps at lr 0.5; the two copies of a tied embedding stay bit-for-bit
equal. The misrouted image gives gradient differences of 2.4e-2 and a loss difference of
4.6e-4.

SGD, not AdamW, for the optimizer steps: Adam divides each update by sqrt(v), which turns the
summation-order ulps of the tiniest gradients into update-sized differences; with AdamW at
lr 1e-2 the same runs differ from the reference by 1.4e-5 after one step and 3.9e-5 after
three (measured), which would hide real errors of that size. SGD keeps the check at 1e-6.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import hf_parity_worker as worker_module
import pytest
import torch.multiprocessing as mp

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-6
#: The misrouted case must exceed the tolerances by at least these factors.
MISROUTE_GRAD_FACTOR = 1000
MISROUTE_LOSS_FACTOR = 10
TIMEOUT_S = 240

CASES = worker_module.cases()
PARITY = [case for case in CASES if not case.misroute]
TIED = [case for case in CASES if case.tied]
(MISROUTE,) = [case for case in CASES if case.misroute]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run every case on 2 ranks once; per rank, {case key: result}."""
    out_dir = tmp_path_factory.mktemp("hf_parity")
    context = mp.start_processes(
        worker_module.worker,
        args=(_free_port(), str(out_dir)),
        nprocs=worker_module.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    for _ in range(TIMEOUT_S):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail(f"the distributed parity run did not finish within {TIMEOUT_S} s")
    return [
        json.loads(Path(out_dir, f"rank{rank}.json").read_text())
        for rank in range(worker_module.WORLD_SIZE)
    ]


def _case(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    per_rank = [rank_results.get(key) for rank_results in results]
    for rank, result in enumerate(per_rank):
        assert result is not None, f"rank {rank} did not run {key} (an earlier case failed?)"
        assert "error" not in result, f"rank {rank} failed {key}:\n{result['error']}"
    return per_rank


def _loss_errors(per_rank: list[dict[str, Any]]) -> list[float]:
    """Per step, |pipeline loss - reference loss| from the one rank that returned a loss."""
    holders = [r for r in per_rank if r["has_last_stage"]]
    assert len(holders) == 1, "exactly one rank holds the last stage"
    (holder,) = holders
    for rank, result in enumerate(per_rank):
        returned = ["loss" in step for step in result["steps"]]
        assert all(returned) if result["has_last_stage"] else not any(returned), (
            f"rank {rank}: step() returns the loss exactly on the last stage's rank"
        )
    return [abs(step["loss"] - step["ref_loss"]) for step in holder["steps"]]


@pytest.mark.parametrize("case", PARITY, ids=[case.key for case in PARITY])
def test_loss_and_every_gradient_match_the_unsplit_model(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = _case(results, case.key)
    for step, error in enumerate(_loss_errors(per_rank)):
        assert error <= LOSS_TOLERANCE, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        assert not set(worker_module.COUNT_FIELDS) & set(result["batch_keys"]), (
            "the batch must leave the items per sample to the pipeline"
        )
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, step {step}"
            assert record["grad_err"] <= GRAD_TOLERANCE, (
                f"{where}: max |grad - reference| = {record['grad_err']:.3e} at "
                f"{record['grad_worst']} (largest reference gradient {record['grad_scale']:.3g})"
            )
            assert not record["missing_grads"], (
                f"{where}: no gradient for {record['missing_grads']}"
            )
            assert record["batch_unchanged"], f"{where}: step() modified the caller's batch"


@pytest.mark.parametrize("case", PARITY, ids=[case.key for case in PARITY])
def test_each_rank_holds_only_its_share_and_together_the_whole_model(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = _case(results, case.key)
    full = set(per_rank[0]["full_names"])
    held = [set(result["names"]) for result in per_rank]
    for rank, result in enumerate(per_rank):
        assert set(result["full_names"]) == full
        assert held[rank] <= full, f"rank {rank} holds unknown names {sorted(held[rank] - full)}"
        assert result["local_numel"] < result["full_numel"], (
            f"rank {rank} holds {result['local_numel']} of the model's "
            f"{result['full_numel']} parameters (stages {result['stages']})"
        )
    assert set().union(*held) == full, f"held by no rank: {sorted(full - set().union(*held))}"
    assert not held[0] & held[1], f"held by both ranks: {sorted(held[0] & held[1])[:5]}"
    assert sorted(s for r in per_rank for s in r["stages"]) == list(
        range(sum(len(r["stages"]) for r in per_rank))
    )


@pytest.mark.parametrize("case", TIED, ids=[case.key for case in TIED])
def test_tied_embedding_copies_stay_equal_through_sgd_steps(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """Tied input/output embeddings: with stage 0 and the last stage on different ranks each
    holds a copy whose gradients are all-reduced (``pipe.tied.active``), with both on one rank
    they are one Parameter. After every SGD step, loss and every parameter match the reference
    and the copies are bitwise equal."""
    per_rank = _case(results, case.key)
    embed, head = worker_module.EMBED, worker_module.HEAD
    split = case.schedule not in ("ZBVZeroBubble", "DualPipeV")
    for rank, result in enumerate(per_rank):
        assert result["reference_tied"], "the reference model ties its embeddings"
        assert result["tied_active"] is split, f"rank {rank}: pipe.tied.active"
        assert len(result["steps"]) == max(case.sgd_steps, 1)
    holders = {
        name: [r for r, res in enumerate(per_rank) if name in res["names"]]
        for name in (embed, head)
    }
    if split:
        assert holders == {embed: [0], head: [1]}
    else:
        assert holders == {embed: [0], head: [0]}
    for step, error in enumerate(_loss_errors(per_rank)):
        assert error <= LOSS_TOLERANCE, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, after step {step}"
            if case.sgd_steps:
                assert record["param_err"] <= PARAM_TOLERANCE, (
                    f"{where}: max |param - reference| = {record['param_err']:.3e} at "
                    f"{record['param_worst']}"
                )
            if split or rank == 0:
                assert record["copies_equal"] is True, f"{where}: the tied copies differ"
                assert record["shared"] is not split, f"{where}: one shared Parameter iff one rank"


def test_a_misrouted_image_fails_the_parity_check(results: list[dict[str, Any]]) -> None:
    """Two equal-grid images of different samples swapped in the pipeline's batch only:
    shapes, counts and placeholders all still agree, so only the comparison can notice."""
    per_rank = _case(results, MISROUTE.key)
    (loss_error,) = _loss_errors(per_rank)
    assert loss_error > MISROUTE_LOSS_FACTOR * LOSS_TOLERANCE, f"loss error {loss_error:.3e}"
    for rank, result in enumerate(per_rank):
        (record,) = result["steps"]
        assert record["grad_err"] > MISROUTE_GRAD_FACTOR * GRAD_TOLERANCE, (
            f"rank {rank}: misrouted media changed the gradients by only {record['grad_err']:.3e}"
        )


def test_cases_cover_what_they_claim(results: list[dict[str, Any]]) -> None:
    """The batches hold what the case names say: text-only samples, videos beside images,
    several LLaVA images in one sample, one 4-D LLaVA image per sample."""
    for case in PARITY:
        result = _case(results, case.key)[0]
        placeholders = result["placeholders"]
        kinds = list(placeholders.values())
        text_only = [not any(kind[i] for kind in kinds) for i in range(worker_module.BATCH_SIZE)]
        shapes = result["media_shapes"]
        if case.batch == "one_image":
            assert not any(text_only)
            assert shapes["pixel_values"][0] == worker_module.BATCH_SIZE
            assert len(shapes["pixel_values"]) == 4
            assert placeholders["image"] == [16] * worker_module.BATCH_SIZE
            continue
        assert text_only[0], f"{case.key}: sample 0 is text-only"
        if case.batch == "text_only":
            assert all(text_only) and not shapes
        if case.batch == "videos":
            assert any(placeholders["video"]) and any(placeholders["image"])
            assert "pixel_values_videos" in shapes and "pixel_values" in shapes
        if case.model_type == "llava" and case.batch == "images":
            assert max(placeholders["image"]) > 16, "some sample has several images"
            assert shapes["pixel_values"][0] > worker_module.BATCH_SIZE - sum(text_only)
        if case.drop_mm_token_type_ids:
            assert "mm_token_type_ids" in result["batch_keys"], "the reference gets them"
        if case.batch == "videos" and case.seed == 3:
            bounds = [0, 2, 4, 5, 6]  # torch's split of 6 samples into 4 microbatches
            video_only = [
                any(placeholders["video"][bounds[k] : bounds[k + 1]])
                and not any(placeholders["image"][bounds[k] : bounds[k + 1]])
                for k in range(worker_module.N_MICROBATCHES)
            ]
            assert any(video_only), f"{case.key}: a microbatch with videos and no images"


def test_measured_maxima(results: list[dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    """The largest differences per case, printed (``pytest -s``) for the docstring's numbers."""
    lines = [f"{'case':50s} {'loss':>9s} {'grad':>9s} {'param':>9s}"]
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for case in PARITY:
        per_rank = _case(results, case.key)
        loss = max(_loss_errors(per_rank))
        steps = [step for result in per_rank for step in result["steps"]]
        grad = max(step["grad_err"] for step in steps)
        param = max((step.get("param_err", 0.0) for step in steps), default=0.0)
        for name, value in (("loss", loss), ("grad", grad), ("param", param)):
            worst[name] = max(worst[name], value)
        lines.append(f"{case.key:50s} {loss:9.2e} {grad:9.2e} {param:9.2e}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst["loss"] <= LOSS_TOLERANCE, worst
    assert worst["grad"] <= GRAD_TOLERANCE, worst
    assert worst["param"] <= PARAM_TOLERANCE, worst
