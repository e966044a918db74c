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

Later families, each under 1F1B on the same 6 samples in 4 microbatches (text-only samples,
samples with several images): GLM-4V (flat patches + ``image_grid_thw``, its own M-RoPE;
images only, as transformers cannot mix images and videos in one GLM-4V forward), also under
GPipe; Mistral3/Pixtral (rows padded to the batch's largest image, true ``image_sizes``);
Gemma3 (one row per image, ``token_type_ids`` 1 at the image tokens: bidirectional image
blocks in full and sliding layers), also under Interleaved1F1B with 6 layers split 1, 2, 2, 1
(stages holding a full then a sliding layer), without ``token_type_ids`` (plain causal masks
in both runs) and tied through 2 SGD steps; PaliGemma (one row per image, 1-based positions,
a bidirectional prefix where ``token_type_ids`` is 0), also under ZBVZeroBubble. Two
adjustments keep these checks meaningful: Gemma3's projector weight, zero at init (which makes
every vision-tower gradient zero), gets small seeded random values; and PaliGemma batches get
a real prefix (images and prompt, no labels) and suffix, as its processor emits them, since
``synthetic_batch`` labels every text token and so marks every token as suffix. Two checks
show the data exercise what is compared: leaving ``token_type_ids`` out moves the unsplit
Gemma3 / PaliGemma reference by far more than the tolerances (so a stage that lost the
bidirectional masks would fail), and every case with images has vision-tower gradients far
above the gradient tolerance.

Tolerances, absolute, fp32: loss 5e-6, gradients 1e-6, parameters after SGD 1e-6. The pipeline
computes the same token losses and the same per-sample forward, but sums in another order: the
loss is a sum per microbatch divided by the whole batch's label tokens, then a sum across
microbatches; each stage's gradients accumulate over microbatches instead of coming from one
backward over the whole batch, and the rank-to-rank hops do not change values. That reorders
fp32 additions and leaves a few ulps: the loss is about 6.9 (ulp 4.8e-7). Measured on torch
2.13 CPU, transformers 5.24 (``pytest -s`` prints the table per case):

=====================================  =========  =========  ==========  =====================
cases                                  loss       gradient   parameter   notes
=====================================  =========  =========  ==========  =====================
Qwen2-VL, Qwen2.5-VL, LLaVA (all)      9.5e-7     8.9e-8     6.0e-8      after 3 SGD steps
GLM-4V (1F1B, GPipe)                   4.8e-7     2.6e-8
Mistral3                               0          2.4e-8
Gemma3 (1F1B, interleaved, causal)     0          7.5e-8
Gemma3 tied, 2 SGD steps               9.5e-7     1.5e-7     1.2e-7      5.6e-8 at step 0
PaliGemma (1F1B, ZBVZeroBubble)        1.4e-6     1.5e-8                 3 ulps of the loss
=====================================  =========  =========  ==========  =====================

Gradients are up to 1.3 in magnitude; the two copies of a tied embedding stay bit-for-bit
equal. In tied Gemma3 the ulp-level differences left by each SGD step grow about 3-4x a step
(gradients 5.6e-8, 1.5e-7, 6.2e-7 in steps 1-3): a third step comes too near the tolerance,
hence 2 steps there. Leaving out ``token_type_ids`` moves the
reference's loss by 7.4e-4 to 1.9e-3 (Gemma3) and 2.5e-4 (PaliGemma), its gradients by
3.2e-2 to 4.3e-2 and 2.0e-3; the largest vision-tower gradient (encoder only) of a case is at
least 5.5e-3 (PaliGemma; Gemma3, with the perturbed projector, at least 4.2e-2). The misrouted
image gives gradient differences of 2.4e-2 and a loss difference of 4.6e-4.

SGD, not AdamW, for the optimizer steps: Adam divides each update by sqrt(v), which turns the
summation-order ulps of the tiniest gradients into update-sized differences; with AdamW at
lr 1e-2 the same runs differ from the reference by 1.4e-5 after one step and 3.9e-5 after
three (measured), which would hide real errors of that size. SGD keeps the check at 1e-6.
"""

from __future__ import annotations

from typing import Any

import hf_parity_worker as worker_module
import pytest

from tests.helpers.parity import COUNT_FIELDS, largest_differences, loss_errors
from tests.helpers.ranks import case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-6
#: The misrouted case must exceed the tolerances by at least these factors.
MISROUTE_GRAD_FACTOR = 1000
MISROUTE_LOSS_FACTOR = 10
#: Leaving out ``token_type_ids`` must move the reference by at least these factors.
MASK_GRAD_FACTOR = 1000
MASK_LOSS_FACTOR = 10
#: Every case with images must have a vision-tower gradient above this factor x tolerance.
VISION_GRAD_FACTOR = 1000
TIMEOUT_S = 240

CASES = worker_module.cases()
PARITY = [case for case in CASES if not case.misroute]
TIED = [case for case in CASES if case.tied]
(MISROUTE,) = [case for case in CASES if case.misroute]
#: Cases whose batch carries ``token_type_ids`` (Gemma3, PaliGemma): bidirectional masks.
MASKED = [
    case
    for case in PARITY
    if case.model_type in ("gemma3", "paligemma") and not case.drop_token_type_ids
]
WITH_IMAGES = [case for case in PARITY if case.batch != "text_only"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run every case on 2 ranks once; per rank, {case key: result}."""
    return spawn_ranks(
        worker_module.worker,
        tmp_path_factory.mktemp("hf_parity"),
        world_size=worker_module.WORLD_SIZE,
        timeout_s=TIMEOUT_S,
        what="the distributed parity run",
    )


@pytest.mark.parametrize("case", PARITY, ids=[case.key for case in PARITY])
def test_loss_and_every_gradient_match_the_unsplit_model(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    for step, error in enumerate(loss_errors(per_rank)):
        assert error <= LOSS_TOLERANCE, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        assert not set(COUNT_FIELDS) & set(result["batch_keys"]), (
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
    per_rank = case_results(results, case.key)
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
    per_rank = case_results(results, case.key)
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
    for step, error in enumerate(loss_errors(per_rank)):
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


@pytest.mark.parametrize("case", MASKED, ids=[case.key for case in MASKED])
def test_the_bidirectional_masks_matter_in_the_test_batch(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """Without ``token_type_ids`` (plain causal masks) the unsplit model's loss and gradients
    move by orders of magnitude more than the tolerances, so these cases' parity with the
    reference that has them proves every stage applied the bidirectional masks: a stage that
    lost them would be off by this much."""
    for rank, result in enumerate(case_results(results, case.key)):
        effect = result["mask_effect"]
        assert effect["loss"] > MASK_LOSS_FACTOR * LOSS_TOLERANCE, (
            f"rank {rank}: the masks move the loss by only {effect['loss']:.3e}"
        )
        assert effect["grad"] > MASK_GRAD_FACTOR * GRAD_TOLERANCE, (
            f"rank {rank}: the masks move the gradients by only {effect['grad']:.3e}"
        )


@pytest.mark.parametrize("case", WITH_IMAGES, ids=[case.key for case in WITH_IMAGES])
def test_the_vision_tower_gradients_are_large_enough_to_check(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """The reference's vision-tower gradients (the encoder, not a separate projector) are far
    above the gradient tolerance, so their parity is not vacuous (Gemma3's zero-initialised
    projector weight would make them all zero: the worker gives it random values)."""
    for rank, result in enumerate(case_results(results, case.key)):
        for step, record in enumerate(result["steps"]):
            assert record["ref_vision_grad"] > VISION_GRAD_FACTOR * GRAD_TOLERANCE, (
                f"rank {rank}, step {step}: largest vision gradient {record['ref_vision_grad']:.3e}"
            )


def test_a_misrouted_image_fails_the_parity_check(results: list[dict[str, Any]]) -> None:
    """Two equal-grid images of different samples swapped in the pipeline's batch only:
    shapes, counts and placeholders all still agree, so only the comparison can notice."""
    per_rank = case_results(results, MISROUTE.key)
    (loss_error,) = loss_errors(per_rank)
    assert loss_error > MISROUTE_LOSS_FACTOR * LOSS_TOLERANCE, f"loss error {loss_error:.3e}"
    for rank, result in enumerate(per_rank):
        (record,) = result["steps"]
        assert record["grad_err"] > MISROUTE_GRAD_FACTOR * GRAD_TOLERANCE, (
            f"rank {rank}: misrouted media changed the gradients by only {record['grad_err']:.3e}"
        )


def test_cases_cover_what_they_claim(results: list[dict[str, Any]]) -> None:
    """The batches hold what the case names say: text-only samples, videos beside images,
    several LLaVA images in one sample, one 4-D LLaVA image per sample; for the later families
    several images in one sample, GLM-4V's flat patches without videos, Mistral3's padded rows
    with their true ``image_sizes``, one Gemma3/PaliGemma row per image with ``token_type_ids``
    (Gemma3: 1 exactly at the image tokens; PaliGemma: a 0 prefix and a 1 suffix in every
    sample), and a Gemma3 stage holding a full and a sliding layer."""
    for case in PARITY:
        result = case_results(results, case.key)[0]
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
        runs = result["image_runs"]
        if case.model_type in ("glm4v", "mistral3", "gemma3", "paligemma"):
            assert max(runs) > 1, f"{case.key}: some sample has several images"
        if case.model_type == "glm4v":
            assert len(shapes["pixel_values"]) == 2 and "image_grid_thw" in result["batch_keys"]
            assert not any("video" in name for name in result["batch_keys"])
        if case.model_type == "mistral3":
            sizes = result["image_sizes"]
            assert len(shapes["pixel_values"]) == 4
            assert shapes["pixel_values"][0] == len(sizes) == sum(runs)
            assert shapes["pixel_values"][2:] == [
                max(s[0] for s in sizes),
                max(s[1] for s in sizes),
            ]
            assert any(size != shapes["pixel_values"][2:] for size in sizes), "a padded row"
        if case.model_type in ("gemma3", "paligemma"):
            assert shapes["pixel_values"][0] == sum(runs), "one row per image"
            has_types = "token_type_ids" in result["batch_keys"]
            assert has_types is not case.drop_token_type_ids
        if case.model_type == "gemma3" and not case.drop_token_type_ids:
            ones = [sum(row) for row in result["token_type_ids"]]
            assert ones == placeholders["image"], "token_type_ids 1 at the image tokens"
        if case.model_type == "paligemma":
            for row in result["token_type_ids"]:
                assert row[0] == 0 and 1 in row, "a prefix (0) and a suffix (1)"
        if case.model_type == "gemma3" and case.layers_per_stage is not None:
            held = [
                {result["layer_types"][i] for i in layers}
                for rank_result in case_results(results, case.key)
                for layers in rank_result["stage_layers"]
            ]
            assert {"full_attention", "sliding_attention"} in held, held
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
    lines = [
        f"{'case':52s} {'loss':>9s} {'grad':>9s} {'param':>9s} {'|grad|':>9s} {'vision':>9s} "
        f"{'mask l':>9s} {'mask g':>9s} {'s':>5s}"
    ]
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for case in PARITY:
        per_rank = case_results(results, case.key)
        differences = largest_differences(per_rank)
        for name, value in differences.items():
            worst[name] = max(worst[name], value)
        loss, grad, param = differences["loss"], differences["grad"], differences["param"]
        steps = [step for result in per_rank for step in result["steps"]]
        scale = max(step["grad_scale"] for step in steps)
        vision = max(step["ref_vision_grad"] for step in steps)
        mask = per_rank[0].get("mask_effect", {"loss": 0.0, "grad": 0.0})
        seconds = max(result["seconds"] for result in per_rank)
        lines.append(
            f"{case.key:52s} {loss:9.2e} {grad:9.2e} {param:9.2e} {scale:9.2e} {vision:9.2e} "
            f"{mask['loss']:9.2e} {mask['grad']:9.2e} {seconds:5.2f}"
        )
    total = max(sum(r["seconds"] for r in rank.values() if "seconds" in r) for rank in results)
    lines.append(f"{'all cases, one rank':52s} {total:.1f} s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst["loss"] <= LOSS_TOLERANCE, worst
    assert worst["grad"] <= GRAD_TOLERANCE, worst
    assert worst["param"] <= PARAM_TOLERANCE, worst
