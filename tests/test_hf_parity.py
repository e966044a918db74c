"""Hugging Face stage splitting: a pipelined step equals the unsplit model's, on 2 gloo ranks.

One harness for every family: ``hf_parity_worker.CASES`` is the table (family, schedule,
stages, batch, SGD steps, tolerances), a new family is a row. One 2-rank spawn runs every case;
each builds the same tiny random VLM on both ranks (``pp_media.testing.tiny_config``, fp32,
dropout 0, train mode); a deep copy (or ``from_pretrained`` of the same checkpoint directory)
is the reference, run on the whole batch with the batch's own ``labels``. The pipeline from
``build_vlm_pipeline`` then runs that batch (6 samples in 4 microbatches [0, 2), [2, 4),
[4, 5), [5, 6): not divisible; text-only samples, and in most cases a whole text-only
microbatch) and must give the reference's loss on the last stage's rank and the reference's
gradient for *every* parameter each rank holds, by the unsplit model's names. No batch
carries ``n_images_per_sample`` / ``n_videos_per_sample`` (nor Llama 4's ``n_tiles_per_image``):
the pipeline derives the counts from the placeholder tokens (Idefics3 / SmolVLM: from the
per-sample pixel rows; Step3p7: one image each), and in two cases ``mm_token_type_ids`` too.

Cases. Qwen2-VL under all 7 torch schedules; Qwen2-VL and Qwen2.5-VL with images and videos in
one batch; microbatches with videos but no images; LLaVA with 0..3 images per sample and with
exactly one image per sample (``pixel_values [B, C, H, W]``); an all-text batch; explicit
``layers_per_stage`` (uneven, and stages without decoder layers at both ends); tied embeddings
with stage 0 and the last stage on different ranks (1F1B, gradients all-reduced) and on one rank
(ZBVZeroBubble, one shared Parameter), through SGD steps; building from a ``save_pretrained``
directory (untied and tied). GLM-4V (images only: transformers cannot mix images and videos in
one GLM-4V forward); Mistral3/Pixtral (rows padded to the largest image, true ``image_sizes``);
Gemma3 (``token_type_ids`` 1 at the image tokens: bidirectional image blocks in full and
sliding layers), also with 6 layers split 1, 2, 2, 1 under Interleaved1F1B, without
``token_type_ids`` and tied through 2 SGD steps; PaliGemma (1-based positions, a bidirectional
prefix where ``token_type_ids`` is 0; its batches get a real prompt prefix and answer suffix).
Qwen3-VL deepstack carried across stages (images, and videos with each frame its own
placeholder run); Idefics3 / SmolVLM per-sample pixel rows with a whole text-only microbatch of
all-zero crops; InternVL images of 1 and 3 tiles in one sample; tied Qwen3-VL; Qwen3.5's
alternating linear- and full-attention decoder (each stage's text model must see its own slice
of ``layer_types``); Kimi-K2.5's flat ``[n, 3, 14, 14]`` patches and time-pooled videos and
Step3p7's global views and local crops (both with MoE text models; their batches come from the
layout stand-ins ``FlatPatchLayout`` / ``Step3Layout``, as their processors need torchvision);
LLaVA-NeXT and LLaVA-OneVision anyres crops (OneVision also with one ``[frames, C, H, W]`` row
per video, and with a microbatch holding a sample of one image beside one of several, so its
per-microbatch ``batch_num_images`` differs from the batch's); Aria's per-image rows with their
``pixel_mask`` (leaving it out moves the reference's loss by 8.0e-4, far above the tolerance)
and Inkling's flat patches counted by ``num_patches`` (4 stages of one layer each: its sliding
and full hybrid layers apart; the head reads the hidden states divided by its muP multiplier),
both with mixture-of-experts text models. Gemma4 (real
``Gemma4ImageProcessorPil``: rows padded to 280 patches with ``image_position_ids``): every
layer's per-layer input and, where a reuse layer runs on a later stage than its store layer,
the shared keys and values cross with their gradients; 2 stages tied, the same with the MoE
block on, and 4 stages of one layer from a checkpoint (keys and values passing through a stage
that does not read them); each later stage receives exactly the carries its layers and the
ones after it read. The MoE families Qwen3.5 MoE,
GLM-4.5V, MiniMax-M3-VL (flat patches from the ``MergedPatchLayout`` stand-in, block-sparse
attention layers) and the Qwen3-Omni thinker (M-RoPE from the token ids and grids, deepstack,
videos with ``video_second_per_grid``): router loss off on 1F1B and Interleaved1F1B, and on
(per-microbatch reference) on one of them each. Llama 4 (chunked-attention, no-RoPE and MoE
layers) with images of one tile and of 2x1, 1x2 and 2x2 grids plus a global tile, several per
sample: under 1F1B and ZBVZeroBubble as its processor emits them (no ``aspect_ratios``: each
image's tiles come from its tokens), under Interleaved1F1B with ``aspect_ratios``.

What shows the checks can fail: a case that swaps the pixels of two equal-grid images of
different samples in the pipeline's batch only must fail the parity check by orders of
magnitude; leaving ``token_type_ids`` out moves the unsplit Gemma3 / PaliGemma reference by far
more than the tolerances (a stage that lost the bidirectional masks would fail); switching
Qwen3-VL's deepstack off moves the reference loss by 280x to 1570x the loss tolerance, and
every later stage is shown to receive its carried features (``3 - f`` tensors for a stage
starting at layer f, non-zero exactly in the microbatches with media); every case with media
has vision-tower gradients far above the gradient tolerance (Gemma3's zero-initialised
projector weight, which would zero them, gets seeded random values from its fixture).

Qwen3-VL-MoE: router loss off against ``model(**batch).loss``; on (the config's
``output_router_logits``, or ``build_vlm_pipeline(output_router_logits=True)``) against the
single-process reference that applies transformers' formula per microbatch
(``per_microbatch_router_loss``), under 1F1B and Interleaved1F1B (4 stages, stage 0 without
decoder layers, so its statistics pass on as a copy); with one microbatch (GPipe) that reference
is ``model(**batch).loss`` itself and the pipeline's ``aux`` is transformers' bit for bit (the
loss differs by one ulp, from the token loss's summation; every gradient is bit for bit equal).
The router term moves the loss by 4000x and the router gradients by 300x the tolerances, and
the whole-batch form differs from the per-microbatch one by 5.7x the loss tolerance, so each of
those mistakes would fail; ``clip_grad_norm_`` and ``eval_step`` see the router term too.

Tolerances, absolute, fp32: loss 5e-6, gradients 1e-6, parameters after SGD 1e-6 (per row in
the table). The pipeline computes the same token losses and the same per-sample forward but
sums in another order: the loss is a sum per microbatch divided by the whole batch's label
tokens, then a sum across microbatches; each stage's gradients accumulate over microbatches
instead of coming from one backward over the whole batch. That leaves a few fp32 ulps: the
loss is about 6.9 (ulp 4.8e-7). Measured on torch 2.13 CPU, transformers 5.24 (``pytest -s``
prints the table per case):

=====================================  =========  =========  ==========  =====================
cases                                  loss       gradient   parameter   notes
=====================================  =========  =========  ==========  =====================
Qwen2-VL, Qwen2.5-VL, LLaVA (all)      9.5e-7     8.9e-8     6.0e-8      after 3 SGD steps
GLM-4V (1F1B, GPipe)                   4.8e-7     2.6e-8
Mistral3                               0          2.4e-8
Gemma3 (1F1B, interleaved, causal)     0          7.5e-8
Gemma3 tied, 2 SGD steps               9.5e-7     1.5e-7     1.2e-7      5.6e-8 at step 0
PaliGemma (1F1B, ZBVZeroBubble)        1.4e-6     1.5e-8                 3 ulps of the loss
Qwen3-VL (images, videos, tied)        4.8e-7     3.4e-8     6.0e-8      2 SGD steps tied
Idefics3, SmolVLM                      9.5e-7     1.9e-8
InternVL (1F1B, GPipe)                 0          8.9e-8
Qwen3.5                                4.8e-7     1.7e-8
Kimi-K2.5 (images, videos)             4.8e-7     1.9e-8
Step3p7 (1F1B, GPipe)                  9.5e-7     3.5e-8
LLaVA-NeXT, LLaVA-OneVision            4.8e-7     1.2e-7
Qwen3-VL-MoE, router loss off          0          5.2e-8
Qwen3-VL-MoE, router loss on           4.8e-7     3.0e-8                 1 microbatch: grad 0
ERNIE-4.5-VL MoE (tied, interleaved)   1.4e-6     5.4e-8     1.2e-7      2 SGD steps tied
ERNIE-4.5-VL MoE, router loss on       9.5e-7     3.0e-8                 per-microbatch ref.
ERNIE-4.5-VL MoE, videos, router on    9.5e-7     2.4e-8                 frame pairs merged
Llama 4 (1F1B, interleaved, ZBV)       0          2.6e-8                 reference from parts
Gemma4 (tied, MoE, 4 stages)           4.8e-7     1.5e-7
Gemma4, 3 ranks (layers 0 / 1-2 / 3)   4.8e-7     1.5e-7
Aria                                   4.8e-7     2.1e-6                 gradients up to 9.6
Inkling                                4.8e-7     1.5e-8
Qwen3.5 MoE (router loss off, on)      4.8e-7     2.2e-8
GLM-4.5V (router loss off, on)         4.8e-7     2.6e-8
MiniMax-M3-VL (router loss off, on)    4.8e-7     3.9e-8
Qwen3-Omni thinker (off, on)           9.5e-7     4.5e-8
=====================================  =========  =========  ==========  =====================

ERNIE-4.5-VL routes vision tokens to its vision experts by ``moe_mm_token_type_ids``: without it
the reference's loss moves by 3.9e-4 to 8.1e-4 and its gradients by 7.2e-3 to 8.0e-3. Llama 4's
reference is ``pp_media.testing.reference_loss``: ``Llama4ForConditionalGeneration.forward``
raises in transformers 5.24 (modeling_llama4.py:1318) right after computing its loss, which
``test_moe_families.py`` reads from the failing frame and finds equal to that reference.

Gradients are up to 1.3 in magnitude (Aria's projector: 9.6, whose fp32 ulp is 9.5e-7, hence
its gradient tolerance of 4e-6); the two copies of a tied embedding stay bit-for-bit
equal. In tied Gemma3 the ulp-level differences left by each SGD step grow about 3-4x a step
(gradients 5.6e-8, 1.5e-7, 6.2e-7 in steps 1-3): a third step comes too near the tolerance,
hence 2 steps there. Leaving out ``token_type_ids`` moves the reference's loss by 7.4e-4 to
1.9e-3 (Gemma3) and 2.5e-4 (PaliGemma), its gradients by 3.2e-2 to 4.3e-2 and 2.0e-3; the
largest vision-tower gradient (encoder only) of a case is at least 5.5e-3 (PaliGemma). The
misrouted image gives gradient differences of 2.4e-2 and a loss difference of 4.6e-4.

SGD, not AdamW, for the optimizer steps: Adam divides each update by sqrt(v), which turns the
summation-order ulps of the tiniest gradients into update-sized differences; with AdamW at
lr 1e-2 the same runs differ from the reference by 1.4e-5 after one step and 3.9e-5 after
three (measured), which would hide real errors of that size. SGD keeps the check at 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hf_parity_worker as worker_module
import pytest

from tests.helpers.parity import COUNT_FIELDS, largest_differences, last_stage_result, loss_errors
from tests.helpers.ranks import case_results, spawn_ranks

Case = worker_module.Case
#: The misrouted case must exceed the tolerances by at least these factors.
MISROUTE_GRAD_FACTOR = 1000
MISROUTE_LOSS_FACTOR = 10
#: Leaving out ``token_type_ids`` must move the reference by at least these factors.
MASK_GRAD_FACTOR = 1000
MASK_LOSS_FACTOR = 10
#: Every case with media must have vision gradients above this factor x its tolerance.
VISION_GRAD_FACTOR = 1000
#: Switching deepstack off must move the reference loss by this factor x the loss tolerance.
DEEPSTACK_LOSS_FACTOR = 100
#: The router loss must move the reference's loss and router gradients by these factors x the
#: tolerances; the whole-batch form must differ from the per-microbatch one by the last (the
#: tiny qwen3_vl_moe: 4000x, 300x and 5.7x measured).
ROUTER_LOSS_FACTOR = 1000
ROUTER_GRAD_FACTOR = 100
WHOLE_BATCH_FACTOR = 4
TIMEOUT_S = 480

N = worker_module.N_MICROBATCHES
B = worker_module.BATCH_SIZE
CASES = worker_module.CASES
PARITY = [case for case in CASES if not case.misroute]
(MISROUTE,) = [case for case in CASES if case.misroute]
TIED = [case for case in CASES if case.tied]
WITH_MEDIA = [case for case in PARITY if case.batch != "text_only"]
#: Cases whose batch carries ``token_type_ids`` (Gemma3, PaliGemma): bidirectional masks.
MASKED = [
    case
    for case in PARITY
    if case.model_type in ("gemma3", "paligemma") and not case.drop_token_type_ids
]
DEEPSTACK = [case for case in CASES if case.model_type == "qwen3_vl"]
#: ERNIE cases with the router loss off: the reference is the unsplit model's own loss.
ERNIE = [case for case in CASES if case.model_type == "ernie4_5_vl_moe" and not case.aux]
LLAMA4 = [case for case in CASES if case.model_type == "llama4"]
GEMMA4 = [case for case in CASES if case.model_type == "gemma4"]
#: Gemma4's text-model modules that only stage 0 holds (the per-layer input embedding).
GEMMA4_STAGE0_ONLY = (
    "model.language_model.embed_tokens_per_layer.",
    "model.language_model.per_layer_model_projection.",
    "model.language_model.per_layer_projection_norm.",
)
#: Gemma4's tiny vision tower: 70 soft tokens at most, 2 x 2 patches pooled into each.
GEMMA4_MAX_PATCHES, GEMMA4_POOLED = 280, 4
QWEN3_5 = [case for case in CASES if case.model_type == "qwen3_5"]
#: Cases with the router load-balancing loss on (MoE families).
ROUTER = [case for case in CASES if case.aux]
#: Qwen3.5's tiny decoder: ``tiny_config("qwen3_5").text_config.layer_types``.
QWEN3_5_LAYER_TYPES = ["linear_attention", "full_attention"] * 2
#: Step3p7's vision tower: 14-pixel patches, then two stride-2 downsamplers.
STEP3_PATCH, STEP3_DOWNSAMPLE = 14, 4
#: Cases whose batch carries Aria's ``pixel_mask`` (padded image rows).
PIXEL_MASKED = [case for case in PARITY if case.model_type == "aria"]
#: Aria's tiny projector: 4 learned queries (placeholders) per image row.
ARIA_QUERIES = 4
#: Llama 4's tiny tiles: (56 // 14)**2 * 0.5**2 placeholders each.
LLAMA4_PER_TILE = 4
#: Inkling's tiny patches: ``[2, 4, 4, 3]`` (2 frames of 4x4 RGB).
INKLING_PATCH = [2, 4, 4, 3]


def _ids(cases: list[Case]) -> list[str]:
    return [case.key for case in cases]


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


def _microbatch_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stage's forward calls for the step's microbatches, in order (torch's first step
    also runs each stage once on uninitialised tensors, to infer shapes: dropped)."""
    assert len(calls) in (N, N + 1), f"{len(calls)} forward calls for {N} microbatches"
    return calls[-N:]


def _per_microbatch(values: list[int], bounds: list[int]) -> list[list[int]]:
    return [values[bounds[k] : bounds[k + 1]] for k in range(N)]


# --- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PARITY, ids=_ids(PARITY))
def test_loss_and_every_gradient_match_the_unsplit_model(
    results: list[dict[str, Any]], case: Case
) -> None:
    per_rank = case_results(results, case.key)
    for step, error in enumerate(loss_errors(per_rank)):
        assert error <= case.loss_tolerance, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        assert not set(COUNT_FIELDS) & set(result["batch"]["keys"]), (
            "the batch must leave the items per sample to the pipeline"
        )
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, step {step}"
            assert record["compared"] == len(result["names"]) > 0
            assert record["grad_err"] <= case.grad_tolerance, (
                f"{where}: max |grad - reference| = {record['grad_err']:.3e} at "
                f"{record['grad_worst']} (largest reference gradient {record['grad_scale']:.3g})"
            )
            assert not record["missing_grads"], (
                f"{where}: no gradient for {record['missing_grads']}"
            )
            assert not record["grad_none"], f"{where}: no gradient for {record['grad_none']}"
            assert record["batch_unchanged"], f"{where}: step() modified the caller's batch"


@pytest.mark.parametrize("case", PARITY, ids=_ids(PARITY))
def test_each_rank_holds_only_its_share_and_together_the_whole_model(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Every parameter is held (and compared) on exactly one rank; the vision parts (with
    LLaVA-NeXT's ``image_newline``) live with stage 0."""
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
    (first,) = [result for result in per_rank if result["has_first_stage"]]
    assert first["vision_names"], "the family has vision parameters"
    assert set(first["vision_names"]) <= set(first["names"]), "vision parts with stage 0"


@pytest.mark.parametrize("case", TIED, ids=_ids(TIED))
def test_tied_embedding_copies_stay_equal_through_sgd_steps(
    results: list[dict[str, Any]], case: Case
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
        assert error <= case.loss_tolerance, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, after step {step}"
            if case.sgd_steps:
                assert record["param_err"] <= case.param_tolerance, (
                    f"{where}: max |param - reference| = {record['param_err']:.3e} at "
                    f"{record['param_worst']}"
                )
            if split or rank == 0:
                assert record["copies_equal"] is True, f"{where}: the tied copies differ"
                assert record["shared"] is not split, f"{where}: one shared Parameter iff one rank"


# --- the checks can fail ---------------------------------------------------------------------


def test_a_misrouted_image_fails_the_parity_check(results: list[dict[str, Any]]) -> None:
    """Two equal-grid images of different samples swapped in the pipeline's batch only:
    shapes, counts and placeholders all still agree, so only the comparison can notice."""
    per_rank = case_results(results, MISROUTE.key)
    (loss_error,) = loss_errors(per_rank)
    assert loss_error > MISROUTE_LOSS_FACTOR * MISROUTE.loss_tolerance, f"{loss_error:.3e}"
    for rank, result in enumerate(per_rank):
        (record,) = result["steps"]
        assert record["grad_err"] > MISROUTE_GRAD_FACTOR * MISROUTE.grad_tolerance, (
            f"rank {rank}: misrouted media changed the gradients by only {record['grad_err']:.3e}"
        )


@pytest.mark.parametrize("case", MASKED, ids=_ids(MASKED))
def test_the_bidirectional_masks_matter_in_the_test_batch(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Without ``token_type_ids`` (plain causal masks) the unsplit model's loss and gradients
    move by orders of magnitude more than the tolerances, so these cases' parity with the
    reference that has them proves every stage applied the bidirectional masks."""
    for rank, result in enumerate(case_results(results, case.key)):
        effect = result["mask_effect"]
        assert effect["loss"] > MASK_LOSS_FACTOR * case.loss_tolerance, (
            f"rank {rank}: the masks move the loss by only {effect['loss']:.3e}"
        )
        assert effect["grad"] > MASK_GRAD_FACTOR * case.grad_tolerance, (
            f"rank {rank}: the masks move the gradients by only {effect['grad']:.3e}"
        )


@pytest.mark.parametrize("case", PIXEL_MASKED, ids=_ids(PIXEL_MASKED))
def test_the_pixel_mask_matters_in_the_test_batch(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Without ``pixel_mask`` the unsplit Aria's loss moves by far more than the tolerance, so
    the parity of these cases proves that stage 0 got each row's own mask with its pixels."""
    for rank, result in enumerate(case_results(results, case.key)):
        effect = result["pixel_mask_effect"]
        assert effect > MASK_LOSS_FACTOR * case.loss_tolerance, (
            f"rank {rank}: pixel_mask moves the loss by only {effect:.3e}"
        )


@pytest.mark.parametrize("case", WITH_MEDIA, ids=_ids(WITH_MEDIA))
def test_the_vision_gradients_are_large_enough_to_check(
    results: list[dict[str, Any]], case: Case
) -> None:
    """The reference's vision-encoder gradients (the first vision path, not a separate
    projector) and the pipeline's vision gradients on stage 0's rank are far above the
    gradient tolerance, so their parity is not vacuous; for Qwen3-VL also those of the
    deepstack mergers, which only the per-layer features reach."""
    floor = VISION_GRAD_FACTOR * case.grad_tolerance
    per_rank = case_results(results, case.key)
    for rank, result in enumerate(per_rank):
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, step {step}"
            assert record["ref_tower_grad"] > floor, f"{where}: {record['ref_tower_grad']:.3e}"
            assert record["ref_vision_grad"] > floor, f"{where}: {record['ref_vision_grad']:.3e}"
    (first,) = [result for result in per_rank if result["has_first_stage"]]
    for step, record in enumerate(first["steps"]):
        assert record["vision_grad"] > floor, f"step {step}: {record['vision_grad']:.3e}"
        if first["layer_feature_count"]:
            assert first["deepstack_names"], "Qwen3-VL has deepstack mergers"
            assert record["ref_deepstack_grad"] > floor, record["ref_deepstack_grad"]
            assert record["deepstack_grad"] > floor, record["deepstack_grad"]


@pytest.mark.parametrize("case", DEEPSTACK, ids=_ids(DEEPSTACK))
def test_deepstack_matters_in_the_test_batch(results: list[dict[str, Any]], case: Case) -> None:
    """Without deepstack the unsplit model's loss moves by far more than the tolerance, while
    the pipelined loss equals the reference's: the carried features were applied."""
    holder = last_stage_result(case_results(results, case.key))
    first_step = holder["steps"][0]
    effect = abs(holder["deepstack_off_loss"] - first_step["ref_loss"])
    assert effect > DEEPSTACK_LOSS_FACTOR * case.loss_tolerance, (
        f"switching deepstack off moves the loss by only {effect:.3e}"
    )
    assert abs(first_step["loss"] - first_step["ref_loss"]) <= case.loss_tolerance


@pytest.mark.parametrize("case", DEEPSTACK, ids=_ids(DEEPSTACK))
def test_later_stages_receive_the_carried_deepstack_features(
    results: list[dict[str, Any]], case: Case
) -> None:
    """A stage starting at decoder layer f receives ``count - f`` per-layer feature tensors
    (count: 3 deepstack layers), non-zero in each microbatch with media and zero in a
    text-only one; stages past the deepstack layers receive none."""
    per_rank = case_results(results, case.key)
    count = per_rank[0]["layer_feature_count"]
    assert count == 3, "tiny Qwen3-VL: deepstack_visual_indexes [0, 1, 2]"
    batch = per_rank[0]["batch"]
    tokens = [i + v for i, v in zip(batch["image_tokens"], batch["video_tokens"], strict=True)]
    media = [any(mb) for mb in _per_microbatch(tokens, batch["bounds"])]
    assert any(media) and not all(media), f"microbatches with media: {media}"
    receivers = 0
    for result in per_rank:
        for stage, calls in result["steps"][0]["received"].items():
            first_layer = result["first_layers"][stage]
            expected = max(0, count - first_layer) if stage != "0" else 0
            for k, call in enumerate(_microbatch_calls(calls)):
                where = f"stage {stage} (first layer {first_layer}), microbatch {k}: {call}"
                assert call["n_carried"] == expected, where
                if media[k]:
                    assert all(value > 0 for value in call["carried_max"]), where
                else:
                    assert all(value == 0 for value in call["carried_max"]), where
            receivers += expected > 0
    assert receivers, "some stage received carried features"


def test_the_interleaved_deepstack_case_carries_features_through_middle_stages(
    results: list[dict[str, Any]],
) -> None:
    """Interleaved1F1B with 4 stages of 1 layer: stages 1 and 2 start at layers 1 and 2, so
    the features of layers 1 and 2 really travel from stage 0 through them."""
    interleaved = [case for case in DEEPSTACK if case.schedule == "Interleaved1F1B"]
    assert interleaved
    for case in interleaved:
        per_rank = case_results(results, case.key)
        layers = {s: v for result in per_rank for s, v in result["stage_layers"].items()}
        assert layers == {"0": [0], "1": [1], "2": [2], "3": [3]}, layers
        firsts = {s: v for result in per_rank for s, v in result["first_layers"].items()}
        assert firsts["1"] == 1 and firsts["2"] == 2
        carried = {
            stage: _microbatch_calls(calls)[0]["n_carried"]
            for result in per_rank
            for stage, calls in result["steps"][0]["received"].items()
        }
        assert carried == {"0": 0, "1": 2, "2": 1, "3": 0}, carried


@pytest.mark.parametrize("case", QWEN3_5, ids=_ids(QWEN3_5))
def test_each_qwen3_5_stage_runs_the_layer_types_of_its_own_layers(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Qwen3.5's text model picks each layer's mask by ``config.layer_types[i]`` over the
    layers it holds: every stage's text model must see ``layer_types`` cut to its own layers
    (``view``), the types its held layers were built with (``modules``). 1F1B: 2 stages of one
    linear-attention and one full-attention layer; Interleaved1F1B: 4 stages of 1 layer, each
    stage one type, so a stage that saw the unsplit list would give its full-attention layer
    the linear-attention mask (a 2-D integer mask, which SDPA refuses). Later stages receive
    the hidden states and position ids only."""
    per_rank = case_results(results, case.key)
    layer_types = per_rank[0]["layer_types"]
    assert layer_types == QWEN3_5_LAYER_TYPES
    layers = {s: v for result in per_rank for s, v in result["stage_layers"].items()}
    seen = {s: v for result in per_rank for s, v in result["stage_layer_types"].items()}
    assert sorted(i for held in layers.values() for i in held) == list(range(len(layer_types)))
    types = {stage: [layer_types[i] for i in held] for stage, held in layers.items()}
    for stage, expected in types.items():
        assert seen[stage] == {"view": expected, "modules": expected}, f"stage {stage}"
    if case.schedule == "Interleaved1F1B":
        assert layers == {"0": [0], "1": [1], "2": [2], "3": [3]}, layers
        linear, full = ["linear_attention"], ["full_attention"]
        assert types == {"0": linear, "1": full, "2": linear, "3": full}, types
    else:
        assert layers == {"0": [0, 1], "1": [2, 3]}, layers
        assert all(set(kinds) == set(layer_types) for kinds in types.values()), types
    for result in per_rank:
        for stage, calls in result["steps"][0]["received"].items():
            n_args = 1 if stage == "0" else 2
            assert all(call["n_args"] == n_args for call in _microbatch_calls(calls)), stage


@pytest.mark.parametrize("case", ERNIE, ids=_ids(ERNIE))
def test_the_moe_token_types_matter_in_the_test_batch(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Without ``moe_mm_token_type_ids`` every token of the unsplit ERNIE model goes to the
    text experts and its loss and gradients move by orders of magnitude more than the
    tolerances: the parity of these cases shows every MoE layer of every stage routed its
    microbatch's vision tokens to the vision experts (in the Interleaved1F1B case the pipeline
    derived the field itself, the reference got the processor's)."""
    for rank, result in enumerate(case_results(results, case.key)):
        effect = result["moe_effect"]
        assert effect["loss"] > MASK_LOSS_FACTOR * case.loss_tolerance, (
            f"rank {rank}: the vision experts move the loss by only {effect['loss']:.3e}"
        )
        assert effect["grad"] > MASK_GRAD_FACTOR * case.grad_tolerance, (
            f"rank {rank}: the vision experts move the gradients by only {effect['grad']:.3e}"
        )
        assert "moe_mm_token_type_ids" in result["batch"]["keys"], "the reference gets them"


@pytest.mark.parametrize("case", LLAMA4, ids=_ids(LLAMA4))
def test_each_llama4_stage_keeps_its_layers_attention_and_experts(
    results: list[dict[str, Any]], case: Case
) -> None:
    """Llama 4's layers fix RoPE / no RoPE and experts / dense MLP at construction from their
    global index (``no_rope_layers``, ``moe_layers``), and the text model picks chunked or full
    attention masks by ``layer_types[i]`` over the layers it holds: every stage's layers keep
    their global kinds and its text model's ``layer_types`` is cut to exactly them. The tiny
    model mixes all of it (layers 0 and 2: RoPE, chunked attention, dense; 1 and 3: no RoPE,
    full attention, experts), so under 1F1B each stage holds both kinds."""
    per_rank = case_results(results, case.key)
    facts = per_rank[0]
    layer_types, no_rope, moe_layers = (
        facts["layer_types"],
        facts["no_rope_layers"],
        facts["moe_layers"],
    )
    assert layer_types == ["chunked_attention", "full_attention"] * 2
    assert no_rope == [1, 0, 1, 0] and moe_layers == [1, 3]
    layers = {s: v for result in per_rank for s, v in result["stage_layers"].items()}
    seen = {s: v for result in per_rank for s, v in result["stage_layer_types"].items()}
    kinds = {s: v for result in per_rank for s, v in result["stage_layer_kinds"].items()}
    assert sorted(i for held in layers.values() for i in held) == [0, 1, 2, 3]
    for stage, held in layers.items():
        assert seen[stage]["view"] == [layer_types[i] for i in held], f"stage {stage}"
        assert kinds[stage]["rope"] == [bool(no_rope[i]) for i in held], f"stage {stage}"
        assert kinds[stage]["moe"] == [i in moe_layers for i in held], f"stage {stage}"
    if case.schedule == "1F1B":
        assert all(len(set(seen[s]["view"])) == 2 for s in layers), seen


# --- the router load-balancing loss ----------------------------------------------------------


@pytest.mark.parametrize("case", ROUTER, ids=_ids(ROUTER))
def test_the_router_loss_is_added_per_microbatch_and_its_check_can_fail(
    results: list[dict[str, Any]], case: Case
) -> None:
    """With the router loss on, the pipeline matched (``test_loss_and_every_gradient...``) a
    reference applying transformers' formula per microbatch. Here: that term moves the loss
    and the router gradients far beyond the tolerances (a pipeline that dropped it would
    fail), ``pipe.last_router_loss`` is the mean per-microbatch ``aux``, and with several
    microbatches the whole-batch loss (``model(**batch).loss``) is farther from the
    reference than the tolerance, so the check tells the two forms apart; with one microbatch
    the reference is ``model(**batch).loss`` and the pipeline's ``aux`` transformers' own, bit
    for bit."""
    holder = last_stage_result(case_results(results, case.key))
    facts, step = holder["router"], holder["steps"][0]
    assert facts["loss"] - facts["off_loss"] > ROUTER_LOSS_FACTOR * case.loss_tolerance, facts
    assert facts["gate_grad_effect"] > ROUTER_GRAD_FACTOR * case.grad_tolerance, facts
    assert step["router_loss"] == pytest.approx(facts["mean_aux"], abs=1e-6)
    if case.microbatches == 1:
        assert facts["loss"] == facts["whole_batch_loss"]
        assert step["router_loss"] == facts["whole_batch_aux"]
    else:
        gap = abs(facts["whole_batch_loss"] - facts["loss"])
        assert gap > WHOLE_BATCH_FACTOR * case.loss_tolerance, facts


API_CHECKS = [case for case in CASES if case.api_checks]


@pytest.mark.parametrize("case", API_CHECKS, ids=_ids(API_CHECKS))
def test_grad_clipping_and_evaluation_see_the_router_loss(
    results: list[dict[str, Any]], case: Case
) -> None:
    """After the step: ``clip_grad_norm_`` gives the reference's gradient norm on every rank
    (the router term's gradients included), and ``eval_step`` the reference's loss in eval
    mode, router term per microbatch included, with ``last_router_loss`` its mean ``aux``."""
    per_rank = case_results(results, case.key)
    for rank, result in enumerate(per_rank):
        record = result["steps"][0]
        assert record["grad_norm"] == pytest.approx(record["ref_grad_norm"], rel=1e-6), rank
    record = last_stage_result(per_rank)["steps"][0]
    assert abs(record["eval_loss"] - record["ref_eval_loss"]) <= case.loss_tolerance, record
    assert record["eval_router_loss"] == pytest.approx(record["router_loss"], abs=1e-6)


def _gemma4_kv_routes(result: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(layer type, store layer, reuse layer)`` for every reuse layer of a Gemma4 result."""
    modes, types = result["kv_sharing_modes"], result["layer_types"]
    store = {types[i]: i for i, mode in enumerate(modes) if mode == "store"}
    return [(types[i], store[types[i]], i) for i, mode in enumerate(modes) if mode == "reuse"]


@pytest.mark.parametrize("case", GEMMA4, ids=_ids(GEMMA4))
def test_each_gemma4_stage_receives_its_per_layer_inputs_and_the_shared_keys_and_values(
    results: list[dict[str, Any]], case: Case
) -> None:
    """A stage starting at layer c receives, after the hidden states, the per-layer input of
    every layer from c on and, per layer type whose store layer runs before c and whose reuse
    layers run from c on, its keys and values (two tensors); the per-layer input embedding and
    projection live on stage 0's rank only."""
    _check_gemma4_carries(case_results(results, case.key))


def _check_gemma4_carries(per_rank: list[dict[str, Any]]) -> None:
    routes = _gemma4_kv_routes(per_rank[0])
    n_layers = per_rank[0]["n_layers"]
    received = 0
    for result in per_rank:
        for stage, calls in result["steps"][0]["received"].items():
            cut = result["first_layers"][stage]
            crossing = {kind for kind, store, reuse in routes if store < cut <= reuse}
            expected = 1 if stage == "0" else 1 + (n_layers - cut) + 2 * len(crossing)
            counts = [call["n_args"] for call in _microbatch_calls(calls)]
            assert counts == [expected] * N, f"stage {stage} (first layer {cut}): {counts}"
            received += len(crossing)
        stage0_only = [name for name in result["names"] if name.startswith(GEMMA4_STAGE0_ONLY)]
        assert bool(stage0_only) is result["has_first_stage"], stage0_only
    assert received, "some stage receives shared keys and values"


# --- the batches hold what the cases claim ---------------------------------------------------

Batch = dict[str, Any]


def _text_only_mb(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    tokens = [i + v for i, v in zip(batch["image_tokens"], batch["video_tokens"], strict=True)]
    assert any(not any(mb) for mb in _per_microbatch(tokens, batch["bounds"])), "text-only mb"


def _video_only_mb(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    images = _per_microbatch(batch["image_tokens"], batch["bounds"])
    videos = _per_microbatch(batch["video_tokens"], batch["bounds"])
    assert any(any(v) and not any(i) for i, v in zip(images, videos, strict=True)), (
        "a microbatch with videos and no images"
    )


def _image_beside_several(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    microbatches = _per_microbatch(batch["image_runs"], batch["bounds"])
    assert any(1 in mb and max(mb) > 1 for mb in microbatches), "one image beside several"


def _several_images(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    assert max(batch["image_runs"]) > 1, "some sample has several images"


def _several_tiles(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    """Llama 4: images of one tile and of several; a sample with several images, one of them
    of several tiles."""
    tiles = _llama4_tiles(batch)
    flat = [n for sample in tiles for n in sample]
    assert 1 in flat and max(flat) > 1, flat
    assert any(len(sample) > 1 and max(sample) > 1 for sample in tiles), tiles


def _image_and_video_in_a_sample(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    pairs = zip(batch["image_tokens"], batch["video_tokens"], strict=True)
    assert any(i and v for i, v in pairs), "a sample with both images and a video"


def _full_and_sliding_stage(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    types = per_rank[0]["layer_types"]
    held = [{types[i] for i in layers} for r in per_rank for layers in r["stage_layers"].values()]
    assert {"full_attention", "sliding_attention"} in held, held


def _kv_crosses_stages(batch: Batch, case: Case, per_rank: list[dict[str, Any]]) -> None:
    stage_of = {i: int(s) for r in per_rank for s, held in r["stage_layers"].items() for i in held}
    routes = _gemma4_kv_routes(per_rank[0])
    assert routes and any(stage_of[reuse] > stage_of[store] for _, store, reuse in routes), (
        "a reuse layer runs on a later stage than its store layer"
    )


#: What ``Case.claims`` may name: facts of the batch (and stages) a case is chosen for.
CLAIMS: dict[str, Callable[[Batch, Case, list[dict[str, Any]]], None]] = {
    "text_only_mb": _text_only_mb,
    "video_only_mb": _video_only_mb,
    "image_beside_several": _image_beside_several,
    "several_images": _several_images,
    "several_tiles": _several_tiles,
    "image_and_video_in_a_sample": _image_and_video_in_a_sample,
    "full_and_sliding_stage": _full_and_sliding_stage,
    "kv_crosses_stages": _kv_crosses_stages,
}


def _glm4v_layout(batch: Batch, case: Case) -> None:
    """Flat patches with ``image_grid_thw``, no videos."""
    assert len(batch["shapes"]["pixel_values"]) == 2 and "image_grid_thw" in batch["keys"]
    assert not any("video" in name for name in batch["keys"])


def _mistral3_layout(batch: Batch, case: Case) -> None:
    """Rows padded to the batch's largest image, with their true ``image_sizes``."""
    pixels, sizes = batch["shapes"]["pixel_values"], batch["image_sizes"]
    assert len(pixels) == 4 and pixels[0] == len(sizes) == sum(batch["image_runs"])
    assert pixels[2:] == [max(s[0] for s in sizes), max(s[1] for s in sizes)]
    assert any(size != pixels[2:] for size in sizes), "a padded row"


def _gemma_layout(batch: Batch, case: Case) -> None:
    """One row per image; Gemma3 ``token_type_ids`` 1 exactly at the image tokens, PaliGemma
    a 0 prefix and a 1 suffix in every sample."""
    assert batch["shapes"]["pixel_values"][0] == sum(batch["image_runs"]), "one row per image"
    assert ("token_type_ids" in batch["keys"]) is not case.drop_token_type_ids
    if case.model_type == "gemma3" and not case.drop_token_type_ids:
        ones = [sum(row) for row in batch["token_type_ids"]]
        assert ones == batch["image_tokens"], "token_type_ids 1 at the image tokens"
    if case.model_type == "paligemma":
        for row in batch["token_type_ids"]:
            assert row[0] == 0 and 1 in row, "a prefix (0) and a suffix (1)"


def _llava_layout(batch: Batch, case: Case) -> None:
    """0..3 rows per sample (several images in one), or exactly one ``[C, H, W]`` each."""
    pixels, tokens = batch["shapes"]["pixel_values"], batch["image_tokens"]
    if case.batch == "one_image":
        assert pixels[0] == B and len(pixels) == 4 and tokens == [16] * B
    else:
        assert max(tokens) > 16 and pixels[0] > sum(1 for t in tokens if t)


def _anyres_layout(batch: Batch, case: Case) -> None:
    """Text-only sample 0, a sample of one image, one of several."""
    images = batch["image_runs"]
    assert images[0] == 0 and max(images) >= 2 and 1 in images, images


def _flat_videos_layout(batch: Batch, case: Case) -> None:
    """Qwen3-VL / Qwen3.5 (MoE) / MiniMax-M3-VL / Kimi-K2.5 videos: ``t*h*w`` patch rows,
    several frames; each frame its own placeholder run (Kimi-K2.5: pooled over time, one run of
    ``h*w/4`` per video)."""
    if case.batch != "videos":
        return
    grids, videos, shapes = batch["video_grid_thw"], batch["video_tokens"], batch["shapes"]
    assert shapes["pixel_values_videos"][0] == sum(t * h * w for t, h, w in grids)
    assert any(t > 1 for t, _, _ in grids), "a video of several frames"
    if case.model_type == "kimi_k25":
        assert sum(batch["video_runs"]) == len(grids)
        assert [v for v in videos if v] == [h * w // 4 for _, h, w in grids]
        assert shapes["pixel_values_videos"][1:] == [3, 14, 14]
    else:
        assert sum(batch["video_runs"]) == sum(t for t, _, _ in grids), "a run per frame"
        assert [v for v in videos if v] == [t * h * w // 4 for t, h, w in grids]


def _omni_layout(batch: Batch, case: Case) -> None:
    """Qwen3-Omni thinker videos: ``t*h*w`` patch rows, several frames, one placeholder run of
    ``t*h*w/4`` per video, and one ``video_second_per_grid`` each."""
    if case.batch != "videos":
        return
    grids, shapes = batch["video_grid_thw"], batch["shapes"]
    assert shapes["pixel_values_videos"][0] == sum(t * h * w for t, h, w in grids)
    assert any(t > 1 for t, _, _ in grids), "a video of several frames"
    assert sum(batch["video_runs"]) == len(grids), "one run per video"
    assert [v for v in batch["video_tokens"] if v] == [t * h * w // 4 for t, h, w in grids]
    assert shapes["video_second_per_grid"] == [len(grids)]


def _kimi_layout(batch: Batch, case: Case) -> None:
    """Flat ``[3, 14, 14]`` patches; ``h*w/4`` placeholders per image."""
    _flat_videos_layout(batch, case)
    grids, runs, tokens = batch["image_grid_thw"], batch["image_runs"], batch["image_tokens"]
    assert batch["shapes"]["pixel_values"] == [sum(t * h * w for t, h, w in grids), 3, 14, 14]
    offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
    assert tokens == [
        sum(h * w // 4 for _, h, w in grids[offsets[i] : offsets[i + 1]]) for i in range(len(runs))
    ]


def _idefics3_layout(batch: Batch, case: Case) -> None:
    """Per-sample pixel rows, one crop per image, a text-only microbatch of all-zero rows."""
    pixels, bounds = batch["shapes"]["pixel_values"], batch["bounds"]
    assert len(pixels) == 5 and pixels[0] == B and "pixel_attention_mask" in batch["shapes"]
    assert batch["real_crops"] == batch["image_runs"], "one crop per image (no split)"
    text_only = [
        not any(tokens) and all(zero)
        for tokens, zero in zip(
            _per_microbatch(batch["image_tokens"], bounds),
            _per_microbatch(batch["zero_rows"], bounds),
            strict=True,
        )
    ]
    assert any(text_only) and not all(text_only), text_only


def _internvl_layout(batch: Batch, case: Case) -> None:
    """Images of different tile counts in one sample; placeholders per tile."""
    tiles, runs, tokens = batch["num_patches"], batch["image_runs"], batch["image_tokens"]
    assert max(tiles) > 1 and len(tiles) == sum(runs)
    offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
    per_sample = [tiles[offsets[i] : offsets[i + 1]] for i in range(len(runs))]
    per_tile = sum(tokens) // sum(tiles)
    assert [sum(t) * per_tile for t in per_sample] == tokens
    assert any(len(t) >= 2 and len(set(t)) > 1 for t in per_sample), per_sample


def _step3_layout(batch: Batch, case: Case) -> None:
    """One global view per sample, smaller local crops; samples and microbatches with and
    without crops."""
    crops, shapes, tokens = batch["num_local_patches"], batch["shapes"], batch["image_tokens"]
    views, local = shapes["pixel_values"], shapes["pixel_values_local"]
    assert views[0] == B and local[0] == sum(crops)
    assert local[-1] < views[-1], "local crops are smaller than the global view"

    def per_view(side: int) -> int:
        return (side // STEP3_PATCH // STEP3_DOWNSAMPLE) ** 2

    assert per_view(local[-1]) > 0
    assert tokens == [per_view(views[-1]) + n * per_view(local[-1]) for n in crops]
    assert 0 in crops and any(crops), "samples with and without crops"
    per_microbatch = [sum(mb) for mb in _per_microbatch(crops, batch["bounds"])]
    assert 0 in per_microbatch and any(per_microbatch), per_microbatch


def _ernie_layout(batch: Batch, case: Case) -> None:
    """Flat ``[3*14*14]`` patch rows (no temporal patch), ``h*w/4`` placeholders per image;
    videos of 2 or 4 frames, ``t*h*w/8`` placeholders each (the resampler merges frame pairs);
    ``moe_mm_token_type_ids`` 1 at the image placeholders and their start and end tokens, 2 at
    a video's."""
    grids, runs, tokens = batch["image_grid_thw"], batch["image_runs"], batch["image_tokens"]
    assert batch["shapes"]["pixel_values"] == [sum(t * h * w for t, h, w in grids), 3 * 14 * 14]
    offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
    assert tokens == [
        sum(h * w // 4 for _, h, w in grids[offsets[i] : offsets[i + 1]]) for i in range(len(runs))
    ]
    types = batch["moe_mm_token_type_ids"]
    ones = [row.count(1) for row in types]
    assert ones == [t + 2 * r for t, r in zip(tokens, runs, strict=True)], ones
    if case.batch != "videos":
        return
    grids, videos = batch["video_grid_thw"], batch["video_tokens"]
    assert batch["shapes"]["pixel_values_videos"] == [
        sum(t * h * w for t, h, w in grids),
        3 * 14 * 14,
    ]
    assert sorted({t for t, _, _ in grids}) == [2, 4], "videos of 2 and of 4 frames"
    assert [v for v in videos if v] == [t * h * w // 8 for t, h, w in grids]
    twos = [row.count(2) for row in types]
    assert twos == [v + 2 * bool(v) for v in videos], twos


def _llama4_tiles(batch: Batch) -> list[list[int]]:
    """Per sample, each image's tiles: its placeholders between its start and end tokens / 4."""
    return [[n // LLAMA4_PER_TILE for n in s] for s in batch["image_placeholders"]]


def _llama4_layout(batch: Batch, case: Case) -> None:
    """``[3, 56, 56]`` tiles, each image's in order: one, or ``h * w`` plus a global one
    (``aspect_ratios``, where the batch keeps them); whole tiles of 4 placeholders each, inside
    each image's start and end tokens."""
    tiles = _llama4_tiles(batch)
    flat = [n for sample in tiles for n in sample]
    assert [len(sample) for sample in tiles] == batch["image_runs"]
    assert [sum(s) for s in batch["image_placeholders"]] == batch["image_tokens"]
    assert all(n % LLAMA4_PER_TILE == 0 for s in batch["image_placeholders"] for n in s)
    assert batch["shapes"]["pixel_values"] == [sum(flat), 3, 56, 56]
    assert ("aspect_ratios" in batch["keys"]) is ("aspect_ratios" not in case.without)
    if "aspect_ratios" in batch:
        grids = [h * w for h, w in batch["aspect_ratios"]]
        assert flat == [g + (g > 1) for g in grids], (flat, grids)


def _gemma4_layout(batch: Batch, case: Case) -> None:
    """One row per image padded to the most patches, ``image_position_ids`` beside it (-1 at
    padding, some rows padded); real patches / 4 placeholders per image; ``mm_token_type_ids``
    1 exactly at the image tokens, 2 at the video tokens. Videos: one row per frame, each
    video's frames together (``num_frames_per_video``, some video of several frames), its
    ``video_position_ids`` row beside it; one placeholder run per frame of real patches / 4."""
    pixels, runs = batch["shapes"]["pixel_values"], batch["image_runs"]
    real = batch["real_image_position_ids"]
    assert pixels == [sum(runs), GEMMA4_MAX_PATCHES, 3 * 4 * 4]
    assert batch["shapes"]["image_position_ids"] == [sum(runs), GEMMA4_MAX_PATCHES, 2]
    assert min(real) < GEMMA4_MAX_PATCHES, "a padded image row"
    offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
    per_sample = [real[offsets[i] : offsets[i + 1]] for i in range(len(runs))]
    assert batch["image_tokens"] == [sum(n // GEMMA4_POOLED for n in s) for s in per_sample]
    videos = batch["video_tokens"]
    types = [i + 2 * v for i, v in zip(batch["image_tokens"], videos, strict=True)]
    assert batch["mm_token_types"] == types
    if case.batch != "videos":
        return
    frames, real = batch["num_frames_per_video"], batch["real_video_position_ids"]
    shape = [sum(frames), GEMMA4_MAX_PATCHES]
    assert batch["shapes"]["pixel_values_videos"] == [*shape, 3 * 4 * 4]
    assert batch["shapes"]["video_position_ids"] == [*shape, 2]
    assert max(frames) > 1 and max(real) < GEMMA4_MAX_PATCHES, "padded frames of a long video"
    assert sum(batch["video_runs"]) == sum(frames), "a placeholder run per frame"
    ends = [sum(frames[:i]) for i in range(len(frames) + 1)]
    per_video = [
        sum(n // GEMMA4_POOLED for n in real[ends[i] : ends[i + 1]]) for i in range(len(frames))
    ]
    assert [v for v in videos if v] == per_video


def _aria_layout(batch: Batch, case: Case) -> None:
    """One ``[3, S, S]`` row and one ``pixel_mask [S, S]`` per image, ``ARIA_QUERIES``
    placeholders each; square images fill their row, the others leave padding."""
    pixels, mask = batch["shapes"]["pixel_values"], batch["shapes"]["pixel_mask"]
    runs = batch["image_runs"]
    assert pixels[0] == mask[0] == sum(runs) and pixels[1:] == [3, *mask[1:]]
    assert batch["image_tokens"] == [ARIA_QUERIES * n for n in runs]
    real = batch["pixel_mask_real"]
    assert max(real) == 1.0 and min(real) < 1.0, real


def _inkling_layout(batch: Batch, case: Case) -> None:
    """Flat ``[patches, 2, p, p, 3]`` patches, ``num_patches`` per image (images of several
    sizes), one placeholder per patch, each image's run after its own ``image_bos``."""
    tiles, runs, tokens = batch["num_patches"], batch["image_runs"], batch["image_tokens"]
    assert batch["shapes"]["pixel_values"] == [sum(tiles), *INKLING_PATCH]
    assert len(tiles) == sum(runs) and len(set(tiles)) > 1, tiles
    offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
    assert tokens == [sum(tiles[offsets[i] : offsets[i + 1]]) for i in range(len(runs))]
    assert batch["image_bos"] == runs


#: Per family, what its batches' layout must show (a family without one checks the rest).
LAYOUTS: dict[str, Callable[[Batch, Case], None]] = {
    "glm4v": _glm4v_layout,
    "mistral3": _mistral3_layout,
    "gemma3": _gemma_layout,
    "paligemma": _gemma_layout,
    "llava": _llava_layout,
    "llava_next": _anyres_layout,
    "llava_onevision": _anyres_layout,
    "qwen3_vl": _flat_videos_layout,
    "qwen3_5": _flat_videos_layout,
    "qwen3_5_moe": _flat_videos_layout,
    "glm4v_moe": _glm4v_layout,
    "minimax_m3_vl": _flat_videos_layout,
    "qwen3_omni_moe_thinker": _omni_layout,
    "kimi_k25": _kimi_layout,
    "idefics3": _idefics3_layout,
    "smolvlm": _idefics3_layout,
    "internvl": _internvl_layout,
    "step3p7": _step3_layout,
    "ernie4_5_vl_moe": _ernie_layout,
    "llama4": _llama4_layout,
    "gemma4": _gemma4_layout,
    "aria": _aria_layout,
    "inkling_mm_model": _inkling_layout,
}


@pytest.mark.parametrize("case", PARITY, ids=_ids(PARITY))
def test_the_batch_holds_what_the_case_claims(results: list[dict[str, Any]], case: Case) -> None:
    """Torch's split into microbatches [0, 2), [2, 4), [4, 5), [5, 6) (one microbatch in the
    router-loss case that equals ``model(**batch).loss``); sample 0 text-only
    (but in one-image-per-sample layouts); a text-only batch without media, a video batch with
    videos beside images; the batch the reference got keeps ``mm_token_type_ids`` where the
    pipeline's drops them; then the case's named ``claims`` and its family's layout."""
    per_rank = case_results(results, case.key)
    batch = per_rank[0]["batch"]
    assert batch["bounds"] == ([0, 2, 4, 5, 6] if case.microbatches == N else [0, B])
    tokens, videos, shapes = batch["image_tokens"], batch["video_tokens"], batch["shapes"]
    if case.batch == "one_image" or case.model_type == "step3p7":
        assert batch["image_runs"] == [1] * B, "one image per sample"
    else:
        assert tokens[0] == videos[0] == 0, "sample 0 is text-only"
    if case.batch == "text_only":
        assert not any(tokens) and not any("pixel" in name for name in shapes)
    else:
        assert any(tokens), "the batch has images"
    if case.batch == "videos":
        assert any(videos) and "pixel_values_videos" in shapes and "pixel_values" in shapes
    if case.drop_mm_token_type_ids:
        assert "mm_token_type_ids" in batch["keys"], "the reference gets them"
    for claim in case.claims:
        CLAIMS[claim](batch, case, per_rank)
    if case.batch != "text_only" and case.model_type in LAYOUTS:
        LAYOUTS[case.model_type](batch, case)


def test_measured_maxima(results: list[dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    """The largest differences per case, printed (``pytest -s``) for the docstring's numbers."""
    lines = [
        f"{'case':52s} {'loss':>9s} {'grad':>9s} {'param':>9s} {'|grad|':>9s} {'vision':>9s} "
        f"{'mask l':>9s} {'mask g':>9s} {'ds off':>9s} {'s':>5s}"
    ]
    for case in PARITY:
        per_rank = case_results(results, case.key)
        differences = largest_differences(per_rank)
        for name, tolerance in (
            ("loss", case.loss_tolerance),
            ("grad", case.grad_tolerance),
            ("param", case.param_tolerance),
        ):
            assert differences[name] <= tolerance, (case.key, differences)
        steps = [step for result in per_rank for step in result["steps"]]
        scale = max(step["grad_scale"] for step in steps)
        vision = max(step["ref_tower_grad"] for step in steps)
        mask = per_rank[0].get("mask_effect", {"loss": 0.0, "grad": 0.0})
        holder = last_stage_result(per_rank)
        off = holder.get("deepstack_off_loss")
        deepstack = abs(off - holder["steps"][0]["ref_loss"]) if off is not None else 0.0
        seconds = max(result["seconds"] for result in per_rank)
        lines.append(
            f"{case.key:52s} {differences['loss']:9.2e} {differences['grad']:9.2e} "
            f"{differences['param']:9.2e} {scale:9.2e} {vision:9.2e} {mask['loss']:9.2e} "
            f"{mask['grad']:9.2e} {deepstack:9.2e} {seconds:5.2f}"
        )
    total = max(sum(r["seconds"] for r in rank.values() if "seconds" in r) for rank in results)
    lines.append(f"{'all cases, one rank':52s} {total:.1f} s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# --- Gemma4 on 3 ranks: 3 stages, one per rank -------------------------------------------------


@pytest.fixture(scope="module")
def three_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run ``THREE_RANK_CASES`` on 3 ranks once; per rank, {case key: result}."""
    return spawn_ranks(
        worker_module.worker_three_ranks,
        tmp_path_factory.mktemp("hf_parity_3"),
        world_size=worker_module.THREE_RANKS,
        timeout_s=TIMEOUT_S,
        what="the 3-rank parity run",
    )


@pytest.mark.parametrize(
    "case", worker_module.THREE_RANK_CASES, ids=_ids(worker_module.THREE_RANK_CASES)
)
def test_three_stages_match_the_unsplit_model(
    three_rank_results: list[dict[str, Any]], case: Case
) -> None:
    """Loss and every gradient as on 2 ranks; each stage holds its layers, receives exactly the
    carries its layers and later ones read, and the batch holds what the case claims."""
    per_rank = case_results(three_rank_results, case.key)
    assert [sorted(r["stage_layers"].values()) for r in per_rank] == [[[0]], [[1, 2]], [[3]]]
    for step, error in enumerate(loss_errors(per_rank)):
        assert error <= case.loss_tolerance, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        for record in result["steps"]:
            assert record["compared"] == len(result["names"]) > 0
            assert record["grad_err"] <= case.grad_tolerance, (
                f"rank {rank}: max |grad - reference| = {record['grad_err']:.3e} at "
                f"{record['grad_worst']}"
            )
            assert not record["missing_grads"] and not record["grad_none"]
    _check_gemma4_carries(per_rank)
    for claim in case.claims:
        CLAIMS[claim](per_rank[0]["batch"], case, per_rank)
