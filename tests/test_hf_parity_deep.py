"""Hugging Face stage splitting, deeper cases: Qwen3-VL deepstack carried across stages,
Idefics3 / SmolVLM per-sample pixel rows, InternVL tiles per image, tied Qwen3-VL embeddings,
Qwen3.5's mixed linear- and full-attention decoder, Kimi-K2.5's flat patches and time-pooled
videos, Step3p7's global views and local crops (Kimi-K2.5 and Step3p7 with MoE text models).

Same pattern as ``test_hf_parity.py``: one 2-rank gloo spawn (``hf_parity_deep_worker.py``) runs
every case; each case builds the same tiny random VLM on both ranks (fp32, dropout 0, train
mode), the unsplit deep copy is the reference on the whole batch with its own ``labels``, and
one pipelined step of that batch (6 samples in 4 microbatches [0, 2), [2, 4), [4, 5), [5, 6);
text-only samples in every batch but Step3p7's, whose samples carry one image each) must give
the reference's loss on the last stage's rank and the reference's gradient for *every*
parameter each rank holds, by the unsplit model's names. No batch carries
``n_images_per_sample`` / ``n_videos_per_sample``: the pipeline derives the counts from the
placeholders (Idefics3 / SmolVLM: from the per-sample pixel rows; Step3p7: one image each).

Cases: Qwen3-VL images under 1F1B, Interleaved1F1B (4 stages of 1 layer) and ZBVZeroBubble;
Qwen3-VL images and videos in one batch (each video frame its own placeholder run) under 1F1B
and Interleaved1F1B; Idefics3 under 1F1B and Interleaved1F1B, SmolVLM under 1F1B, each batch
with a whole text-only microbatch (all-zero pixel rows); InternVL under 1F1B and GPipe with
several images of 1 and 3 tiles in one sample; tied Qwen3-VL embeddings (1F1B, copies on two
ranks) through 2 SGD steps; Qwen3.5 (Qwen3-VL's vision without deepstack; decoder layers
alternating linear attention and full attention by ``layer_types``) under 1F1B (2 layers per
stage, one of each type) and Interleaved1F1B (4 stages of 1 layer, each stage one type: each
stage's text model must see its own slice of ``layer_types``), and with frame-separated video
runs beside images under 1F1B; Kimi-K2.5 (flat ``[n, 3, 14, 14]`` patches with
``image_grid_thw``; DeepSeek-V3 MoE text model) under 1F1B with images, and with videos
(``pixel_values_videos [t*h*w, 3, 14, 14]`` with ``video_grid_thw``, features pooled over time:
one run of ``h*w/4`` placeholders per video) beside images; Step3p7 (one ``[3, 112, 112]``
global view per sample plus flat ``[3, 56, 56]`` local crops counted by ``num_local_patches``;
MoE text model) under 1F1B and GPipe, each batch with samples and microbatches with and
without crops. Kimi-K2.5's and Step3p7's image processors need torchvision, which is not
importable beside the CPU build of torch here: their batches come from the stand-ins
``tiny_models.image_processor`` returns (``FlatPatchLayout``, ``Step3Layout``), which emit the
processors' fields and layout but not their resized pixel values. All models are built with
``from_config`` in the worker, none loaded from a checkpoint.

Deepstack: the tiny Qwen3-VL adds vision features after decoder layers 0, 1 and 2
(``deepstack_visual_indexes [0, 1, 2]``), so stage 0 must send the features of the layers it
does not hold on to later stages. The worker's forward pre-hooks record what every later stage
received: a stage starting at layer f gets ``3 - f`` carried feature tensors (Interleaved1F1B
and ZBVZeroBubble: stages starting at layers 1 and 2 get 2 and 1), non-zero exactly in the
microbatches with media. Switching deepstack off in the unsplit reference (its
``_deepstack_process`` patched to return the hidden states unchanged) moves the loss by
1.4e-3 to 7.8e-3, 280x to 1570x the loss tolerance, while the pipelined loss stays within it:
a stage that dropped or misplaced the carried features would fail.

Tolerances, absolute, fp32: loss 5e-6, gradients 1e-6, parameters after SGD 1e-6 (as in
``test_hf_parity.py``). The pipeline computes the same per-sample forward and the same token
losses but sums in another order (a loss sum per microbatch over the whole batch's label
tokens, gradients accumulated over microbatches), which leaves a few fp32 ulps: the loss is
about 6.9 (ulp 4.8e-7). Measured on torch 2.13 CPU, transformers 5.24 (loss: |pipeline -
reference|; grad: max over every gradient entry of both ranks; param: after the SGD steps):

=======================================  ======  =======  =======
case                                     loss    grad     param
=======================================  ======  =======  =======
qwen3_vl/images/1F1B/seed1               0       1.9e-8
qwen3_vl/images/Interleaved1F1B/seed1    0       1.9e-8
qwen3_vl/images/ZBVZeroBubble/seed7      4.8e-7  1.9e-8
qwen3_vl/videos/1F1B/seed1               4.8e-7  3.0e-8
qwen3_vl/videos/Interleaved1F1B/seed3    4.8e-7  3.7e-8
idefics3/images/1F1B/seed1               4.8e-7  1.1e-8
idefics3/images/Interleaved1F1B/seed7    4.8e-7  7.5e-9
smolvlm/images/1F1B/seed1                4.8e-7  1.1e-8
internvl/images/1F1B/seed1               0       6.0e-8
internvl/images/GPipe/seed2              0       7.5e-8
qwen3_vl/images/1F1B/tied/sgd2/seed1     0       4.5e-8   1.2e-7
qwen3_5/images/1F1B/seed1                0       1.2e-8
qwen3_5/images/Interleaved1F1B/seed7     4.8e-7  1.5e-8
qwen3_5/videos/1F1B/seed1                4.8e-7  1.5e-8
kimi_k25/images/1F1B/seed1               4.8e-7  1.1e-8
kimi_k25/videos/1F1B/seed1               4.8e-7  3.0e-8
step3p7/images/1F1B/seed1                4.8e-7  3.2e-8
step3p7/images/GPipe/seed3               0       3.4e-8
=======================================  ======  =======  =======

The largest reference gradients are 0.065 to 0.5; the largest vision-tower gradients 0.019
(Step3p7) to 0.50 (InternVL), Qwen3-VL's deepstack mergers 0.08 to 0.12, all far above the
gradient tolerance, so the vision halves of the checks are not vacuous. The two
copies of the tied embedding stay bit-for-bit equal. ``pytest -s`` prints the table again.
"""

from __future__ import annotations

from typing import Any

import hf_parity_deep_worker as worker_module
import pytest

from tests.helpers.parity import COUNT_FIELDS, largest_differences, last_stage_result, loss_errors
from tests.helpers.ranks import case_results, spawn_ranks

LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-6
#: Vision-tower (and deepstack-merger) gradients must exceed this factor x GRAD_TOLERANCE.
VISION_GRAD_FACTOR = 1000
#: Switching deepstack off must move the reference loss by this factor x LOSS_TOLERANCE.
DEEPSTACK_LOSS_FACTOR = 100
TIMEOUT_S = 240

CASES = worker_module.cases()
KEYS = [case.key for case in CASES]
QWEN3 = [case for case in CASES if case.model_type == "qwen3_vl"]
TIED = [case for case in CASES if case.tied]
QWEN3_5 = [case for case in CASES if case.model_type == "qwen3_5"]
N = worker_module.N_MICROBATCHES
#: Qwen3.5's tiny decoder: ``tiny_config("qwen3_5").text_config.layer_types``.
QWEN3_5_LAYER_TYPES = ["linear_attention", "full_attention"] * 2
#: Step3p7's vision tower: 14-pixel patches, then two stride-2 downsamplers.
STEP3_PATCH, STEP3_DOWNSAMPLE = 14, 4


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run every case on 2 ranks once; per rank, {case key: result}."""
    return spawn_ranks(
        worker_module.worker,
        tmp_path_factory.mktemp("hf_parity_deep"),
        world_size=worker_module.WORLD_SIZE,
        timeout_s=TIMEOUT_S,
        what="the distributed parity run",
    )


def _media_microbatches(batch: dict[str, Any]) -> list[bool]:
    """Per microbatch, whether any of its samples has image or video placeholders."""
    bounds = batch["bounds"]
    tokens = [
        image + video
        for image, video in zip(
            batch["image_tokens"],
            batch.get("video_tokens", [0] * len(batch["image_tokens"])),
            strict=True,
        )
    ]
    return [any(tokens[bounds[k] : bounds[k + 1]]) for k in range(N)]


def _microbatch_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stage's forward calls for the step's microbatches, in order (torch's first step
    also runs each stage once on uninitialised tensors, to infer shapes: dropped)."""
    assert len(calls) in (N, N + 1), f"{len(calls)} forward calls for {N} microbatches"
    return calls[-N:]


@pytest.mark.parametrize("case", CASES, ids=KEYS)
def test_loss_and_every_gradient_match_the_unsplit_model(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    per_rank = case_results(results, case.key)
    for step, error in enumerate(loss_errors(per_rank)):
        assert error <= LOSS_TOLERANCE, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        assert not set(COUNT_FIELDS) & set(result["batch"]["keys"]), (
            "the batch must leave the items per sample to the pipeline"
        )
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, step {step}"
            assert record["compared"] == len(result["names"]) > 0
            assert record["grad_err"] <= GRAD_TOLERANCE, (
                f"{where}: max |grad - reference| = {record['grad_err']:.3e} at "
                f"{record['grad_worst']} (largest reference gradient {record['grad_scale']:.3g})"
            )
            assert not record["missing_grads"], (
                f"{where}: no gradient for {record['missing_grads']}"
            )
            assert record["batch_unchanged"], f"{where}: step() modified the caller's batch"
    # Every parameter of the model is compared, on exactly one rank.
    full = set(per_rank[0]["full_names"])
    held = [set(result["names"]) for result in per_rank]
    assert set().union(*held) == full, f"compared on no rank: {sorted(full - set().union(*held))}"
    assert not held[0] & held[1], f"held by both ranks: {sorted(held[0] & held[1])[:5]}"


@pytest.mark.parametrize("case", CASES, ids=KEYS)
def test_the_vision_tower_gradients_are_exercised(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """The reference's and the pipeline's vision-tower gradients (on stage 0's rank) are far
    above the gradient tolerance, so the media paths run and their parity is not vacuous;
    for Qwen3-VL also those of the deepstack mergers, which only the per-layer features reach."""
    per_rank = case_results(results, case.key)
    floor = VISION_GRAD_FACTOR * GRAD_TOLERANCE
    first = [result for result in per_rank if result["has_first_stage"]]
    assert len(first) == 1
    assert first[0]["vision_names"], "the family has vision parameters"
    for step, record in enumerate(first[0]["steps"]):
        assert record["ref_vision_grad"] > floor, f"step {step}: {record['ref_vision_grad']:.3e}"
        assert record["vision_grad"] > floor, f"step {step}: {record['vision_grad']:.3e}"
        if case.model_type == "qwen3_vl":
            assert first[0]["deepstack_names"], "Qwen3-VL has deepstack mergers"
            assert record["ref_deepstack_grad"] > floor, record["ref_deepstack_grad"]
            assert record["deepstack_grad"] > floor, record["deepstack_grad"]


@pytest.mark.parametrize("case", QWEN3, ids=[case.key for case in QWEN3])
def test_deepstack_matters_in_the_test_batch(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """Without deepstack the unsplit model's loss moves by far more than the tolerance, while
    the pipelined loss equals the reference's: the carried features were applied."""
    per_rank = case_results(results, case.key)
    holder = last_stage_result(per_rank)
    first_step = holder["steps"][0]
    effect = abs(holder["deepstack_off_loss"] - first_step["ref_loss"])
    assert effect > DEEPSTACK_LOSS_FACTOR * LOSS_TOLERANCE, (
        f"switching deepstack off moves the loss by only {effect:.3e}"
    )
    assert abs(first_step["loss"] - first_step["ref_loss"]) <= LOSS_TOLERANCE


@pytest.mark.parametrize("case", QWEN3, ids=[case.key for case in QWEN3])
def test_later_stages_receive_the_carried_deepstack_features(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """A stage starting at decoder layer f receives ``count - f`` per-layer feature tensors
    (count: 3 deepstack layers), non-zero in each microbatch with media and zero in a
    text-only one; stages past the deepstack layers receive none."""
    per_rank = case_results(results, case.key)
    count = per_rank[0]["layer_feature_count"]
    assert count == 3, "tiny Qwen3-VL: deepstack_visual_indexes [0, 1, 2]"
    media = _media_microbatches(per_rank[0]["batch"])
    assert any(media) and not all(media), f"microbatches with media: {media}"
    receivers = 0
    for result in per_rank:
        # The first step's batch (the one described in the result).
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
    interleaved = [case for case in QWEN3 if case.schedule == "Interleaved1F1B"]
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


@pytest.mark.parametrize("case", QWEN3_5, ids=[case.key for case in QWEN3_5])
def test_each_qwen3_5_stage_runs_the_layer_types_of_its_own_layers(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """Qwen3.5's text model picks each layer's mask by ``config.layer_types[i]`` over the
    layers it holds: every stage's text model must see ``layer_types`` cut to its own layers
    (``view``), the types its held layers were built with (``modules``). 1F1B: 2 stages of one
    linear-attention and one full-attention layer; Interleaved1F1B: 4 stages of 1 layer, each
    stage one type (rank 0's stages 0 and 2 linear attention, rank 1's stages 1 and 3 full
    attention), so a stage that saw the unsplit list would give its full-attention layer the
    linear-attention mask (a 2-D integer mask, which SDPA refuses). Later stages receive the
    hidden states and position ids only."""
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


@pytest.mark.parametrize("case", TIED, ids=[case.key for case in TIED])
def test_tied_embedding_copies_stay_equal_through_sgd_steps(
    results: list[dict[str, Any]], case: worker_module.Case
) -> None:
    """Tied embeddings with stage 0 and the last stage on different ranks: each holds a copy,
    gradients all-reduced. After every SGD step, loss and every parameter match the reference
    and the copies are bitwise equal."""
    per_rank = case_results(results, case.key)
    embed, head = worker_module.EMBED, worker_module.HEAD
    holders = {
        name: [r for r, result in enumerate(per_rank) if name in result["names"]]
        for name in (embed, head)
    }
    assert holders == {embed: [0], head: [1]}
    for step, error in enumerate(loss_errors(per_rank)):
        assert error <= LOSS_TOLERANCE, f"step {step}: |loss - reference| = {error:.3e}"
    for rank, result in enumerate(per_rank):
        assert result["reference_tied"], "the reference model ties its embeddings"
        assert result["tied_active"], f"rank {rank}: pipe.tied.active"
        assert len(result["steps"]) == case.sgd_steps == 2
        for step, record in enumerate(result["steps"]):
            where = f"rank {rank}, after step {step}"
            assert record["param_err"] <= PARAM_TOLERANCE, (
                f"{where}: max |param - reference| = {record['param_err']:.3e} at "
                f"{record['param_worst']}"
            )
            assert record["copies_equal"] is True, f"{where}: the tied copies differ"


def test_batches_hold_what_the_cases_claim(results: list[dict[str, Any]]) -> None:
    """Text-only samples everywhere but in Step3p7's batches (one image per sample); Qwen3-VL
    and Qwen3.5 videos beside images, each frame its own placeholder run; Kimi-K2.5 flat
    ``[3, 14, 14]`` patches, videos pooled over time (one run of ``h*w/4`` per video); Idefics3 /
    SmolVLM per-sample pixel rows with a whole text-only microbatch of all-zero crops; InternVL
    images of different tile counts in one sample; Step3p7 samples and microbatches with and
    without local crops."""
    for case in CASES:
        batch = case_results(results, case.key)[0]["batch"]
        bounds = batch["bounds"]
        assert bounds == [0, 2, 4, 5, 6]
        tokens = batch["image_tokens"]
        videos = batch.get("video_tokens", [0] * len(tokens))
        if case.model_type == "step3p7":
            assert batch["image_runs"] == [1] * worker_module.BATCH_SIZE, "one image per sample"
        else:
            assert tokens[0] == videos[0] == 0, f"{case.key}: sample 0 is text-only"
        assert any(tokens), f"{case.key}: the batch has images"
        shapes = batch["shapes"]
        if case.videos:
            assert any(videos) and "pixel_values_videos" in shapes and "pixel_values" in shapes
            if case.model_type in ("qwen3_5", "kimi_k25"):  # seed 1: samples 1 and 4
                assert any(t and v for t, v in zip(tokens, videos, strict=True)), "both in one"
            grids = batch["video_grid_thw"]
            assert shapes["pixel_values_videos"][0] == sum(t * h * w for t, h, w in grids)
            assert any(t > 1 for t, _, _ in grids), f"{case.key}: a video of several frames"
            if case.model_type == "kimi_k25":  # pooled over time: one run per video
                assert sum(batch["video_runs"]) == len(grids)
                assert [v for v in videos if v] == [h * w // 4 for _, h, w in grids]
            else:
                assert sum(batch["video_runs"]) == sum(t for t, _, _ in grids), "a run per frame"
                assert [v for v in videos if v] == [t * h * w // 4 for t, h, w in grids]
        if case.model_type == "kimi_k25":
            grids, runs = batch["image_grid_thw"], batch["image_runs"]
            assert shapes["pixel_values"] == [sum(t * h * w for t, h, w in grids), 3, 14, 14]
            if case.videos:
                assert shapes["pixel_values_videos"][1:] == [3, 14, 14]
            offsets = [sum(runs[:i]) for i in range(len(runs) + 1)]
            assert tokens == [
                sum(h * w // 4 for _, h, w in grids[offsets[i] : offsets[i + 1]])
                for i in range(len(runs))
            ]
        if case.model_type in ("idefics3", "smolvlm"):
            pixels = shapes["pixel_values"]
            assert len(pixels) == 5 and pixels[0] == worker_module.BATCH_SIZE
            assert "pixel_attention_mask" in shapes
            assert batch["real_crops"] == batch["image_runs"], "one crop per image (no split)"
            text_only = [
                not any(tokens[bounds[k] : bounds[k + 1]])
                and all(batch["zero_rows"][bounds[k] : bounds[k + 1]])
                for k in range(N)
            ]
            assert any(text_only), f"{case.key}: a text-only microbatch of all-zero pixel rows"
            assert not all(text_only)
        if case.model_type == "internvl":
            tiles, image_runs = batch["num_patches"], batch["image_runs"]
            assert max(tiles) > 1 and len(tiles) == sum(image_runs)
            offsets = [sum(image_runs[:i]) for i in range(len(image_runs) + 1)]
            per_sample = [tiles[offsets[i] : offsets[i + 1]] for i in range(len(image_runs))]
            per_tile = sum(tokens) // sum(tiles)
            assert [sum(t) * per_tile for t in per_sample] == tokens
            assert any(len(t) >= 2 and len(set(t)) > 1 for t in per_sample), per_sample
        if case.model_type == "step3p7":
            crops = batch["num_local_patches"]
            views, local = shapes["pixel_values"], shapes["pixel_values_local"]
            assert views[0] == worker_module.BATCH_SIZE and local[0] == sum(crops)
            assert local[-1] < views[-1], "local crops are smaller than the global view"

            def per_view(side: int) -> int:
                return (side // STEP3_PATCH // STEP3_DOWNSAMPLE) ** 2

            assert per_view(local[-1]) > 0
            assert tokens == [per_view(views[-1]) + n * per_view(local[-1]) for n in crops]
            assert 0 in crops and any(crops), f"{case.key}: samples with and without crops"
            per_microbatch = [sum(crops[bounds[k] : bounds[k + 1]]) for k in range(N)]
            assert 0 in per_microbatch and any(per_microbatch), per_microbatch


def test_measured_maxima(results: list[dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    """The largest differences per case, printed (``pytest -s``) for the docstring's numbers."""
    lines = [
        f"{'case':40s} {'loss':>9s} {'grad':>9s} {'param':>9s} {'|grad|':>9s} {'vision':>9s} "
        f"{'deepst.':>9s} {'ds off':>9s} {'s':>5s}"
    ]
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for case in CASES:
        per_rank = case_results(results, case.key)
        differences = largest_differences(per_rank)
        for name, value in differences.items():
            worst[name] = max(worst[name], value)
        loss, grad, param = differences["loss"], differences["grad"], differences["param"]
        steps = [step for result in per_rank for step in result["steps"]]
        holder = last_stage_result(per_rank)
        off = holder.get("deepstack_off_loss")
        effect = abs(off - holder["steps"][0]["ref_loss"]) if off is not None else 0.0
        lines.append(
            f"{case.key:40s} {loss:9.2e} {grad:9.2e} {param:9.2e} "
            f"{max(step['grad_scale'] for step in steps):9.2e} "
            f"{max(step['ref_vision_grad'] for step in steps):9.2e} "
            f"{max(step['ref_deepstack_grad'] for step in steps):9.2e} {effect:9.2e} "
            f"{max(result['seconds'] for result in per_rank):5.2f}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst["loss"] <= LOSS_TOLERANCE, worst
    assert worst["grad"] <= GRAD_TOLERANCE, worst
    assert worst["param"] <= PARAM_TOLERANCE, worst
