"""LLaVA-NeXT and LLaVA-OneVision: anyres crops ``[n_images, max_crops, C, H, W]``, ``image_sizes``.

Tiny random models (``tiny_llava_next``: 56-pixel crops, pinpoints up to 2x2 crops) and their
real image processors (PIL backend) build ``synthetic_batch`` batches of 6 samples with 0..3
images of several sizes (sample 0 text-only). No batch carries ``n_images_per_sample``: the
pipeline derives it from the placeholders.

Single process: each image's placeholder count (``tokens_per_item``, the processor's own rule)
equals the length of its features from the model's own ``get_image_features``, the unsplit
forward accepts the batch, and per microbatch the adapter's features (OneVision: with
``batch_num_images`` rebuilt for the microbatch's samples) fill exactly its placeholders.

Two gloo ranks: ``build_vlm_pipeline(...).step(batch)`` with 4 microbatches (1F1B for both
families, Interleaved1F1B for OneVision) gives the unsplit ``model(**batch).loss`` within 5e-6
and every gradient within 1e-6 (absolute, fp32); the differences are summation order only.
Measured on torch 2.13 CPU, transformers 5.24: loss 4.8e-7 (1 ulp at 6.9) in every case,
gradients at most 1.2e-7 (LLaVA-NeXT), 3.0e-8 and 6.0e-8 (OneVision 1F1B, Interleaved1F1B).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import pytest
import torch

from tests.helpers.parity import largest, max_abs_diff, placeholder_runs, quiet_transformers
from tests.helpers.ranks import case_results, run_cases_on_rank, spawn_ranks

BATCH_SIZE = 6
N_MICROBATCHES = 4
LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
TIMEOUT_S = 120
#: (family, batch seed). Images per sample (``synthetic_batch``'s draw; microbatches of
#: 2, 2, 1, 1 samples): seed 1 [0, 3, 0, 0, 3, 1] (a text-only microbatch), seed 12
#: [0, 3, 2, 1, 1, 2] and seed 9 [0, 0, 2, 1, 2, 0] (a microbatch with a sample of one image
#: beside one of two, so OneVision's per-microbatch ``batch_num_images`` differs from the
#: batch's, and text-only microbatches).
UNIT_CASES = (("llava_next", 1), ("llava_onevision", 12), ("llava_onevision", 9))
#: (family, schedule, batch seed, with videos). Videos are OneVision's one row per video,
#: ``[n_videos, frames, C, H, W]``, built in its video processor's layout (that processor needs
#: torchvision), beside the images of the same batch.
PARITY_CASES = (
    ("llava_next", "1F1B", 1, False),
    ("llava_onevision", "1F1B", 12, False),
    ("llava_onevision", "Interleaved1F1B", 9, False),
    ("llava_onevision", "1F1B", 9, True),
)


def _setup() -> None:
    torch.set_num_threads(1)
    quiet_transformers()


def _model(model_type: str) -> tuple[Any, Any]:
    import transformers

    from pp_media._cli.tiny_models import tiny_config

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.train()
    return config, model


def _batch(config: Any, seed: int, videos: bool = False) -> dict[str, torch.Tensor]:
    from pp_media._cli.synthetic import default_seq_len, synthetic_batch

    seq_len = default_seq_len(config, videos=videos)
    return synthetic_batch(config, BATCH_SIZE, seq_len, seed=seed, videos=videos)


def _images_per_sample(batch: dict[str, torch.Tensor], config: Any) -> list[int]:
    """Placeholder runs per sample (the synthetic rows put text between images)."""
    return placeholder_runs(batch["input_ids"], config.image_token_id)


# --- single process -----------------------------------------------------------------------


def _microbatches(images: list[int]) -> list[list[int]]:
    """Images per sample of each microbatch, as the engine splits the samples."""
    from pp_media._core.bounds import sample_bounds

    bounds = sample_bounds(len(images), N_MICROBATCHES)
    return [images[bounds[k] : bounds[k + 1]] for k in range(N_MICROBATCHES)]


@pytest.mark.parametrize(
    ("model_type", "seed"), UNIT_CASES, ids=[f"{m}-{s}" for m, s in UNIT_CASES]
)
def test_tokens_per_item_are_what_the_model_consumes(model_type: str, seed: int) -> None:
    from pp_media._hf.batch import prepare_step_inputs
    from pp_media._hf.families import adapter_for
    from pp_media._pipeline.staging import microbatch_media_kwargs

    _setup()
    config, model = _model(model_type)
    adapter = adapter_for(config)
    kind = adapter.media[0]  # the images; OneVision's videos have their own parity case
    batch = _batch(config, seed)
    images = _images_per_sample(batch, config)
    assert images[0] == 0 and max(images) >= 2 and 1 in images, images
    assert len(set(map(tuple, batch["image_sizes"].tolist()))) > 1, "images of several sizes"

    tokens = adapter.tokens_per_item(config, kind, batch)
    fields = {}
    if model_type == "llava_onevision":
        assert batch["batch_num_images"].tolist() == [n for n in images if n]
        fields["batch_num_images"] = batch["batch_num_images"]
    with torch.no_grad():
        output = model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], **fields, return_dict=True
        )
        per_image = [feature.shape[0] for feature in output.pooler_output]
        assert tokens.tolist() == per_image
        assert torch.isfinite(model(**batch).loss)  # the forward's own placeholder check
    if model_type == "llava_onevision":
        # A sample's only image is cut into crops, one of several is not: counts differ.
        alone = [t for t, n in zip(tokens.tolist(), _owners_count(images), strict=True) if n == 1]
        shared = {t for t, n in zip(tokens.tolist(), _owners_count(images), strict=True) if n > 1}
        base = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        assert shared == {base + 1} and alone and min(alone) != base + 1

    # Per microbatch: the batch's batch_num_images is no engine input (the engine would split
    # it by rows); stage 0 gets each microbatch's own (OneVision), without the counts, and its
    # features fill exactly the microbatch's placeholders.
    inputs = prepare_step_inputs(batch, adapter, config, N_MICROBATCHES)
    assert "batch_num_images" not in inputs.kwargs and "n_images_per_sample" not in batch
    for k, ids in enumerate(inputs.input_ids.tensor_split(N_MICROBATCHES)):
        own = {name: chunks[k] for name, chunks in inputs.media.items()}
        stage0 = microbatch_media_kwargs(own)
        placeholders = int((ids == config.image_token_id).sum())
        if "pixel_values" not in stage0:
            assert placeholders == 0
            continue
        assert "n_images_per_sample" not in stage0
        if model_type == "llava_onevision":
            counts = own["n_images_per_sample"]
            assert stage0["batch_num_images"].tolist() == counts[counts > 0].tolist()
        with torch.no_grad():
            features, extra = adapter.features(model.model, kind, stage0)
        expected = int(adapter.tokens_per_item(config, kind, own).sum())
        assert features.shape[0] == placeholders == expected
        assert extra == []


def _owners_count(images: list[int]) -> list[int]:
    """For each image in batch order, how many images its sample has."""
    return [n for n in images for _ in range(n)]


def test_onevision_rejects_a_batch_num_images_that_does_not_match_the_samples() -> None:
    """Images not grouped by sample give the processor's ``batch_num_images`` of ones; with
    the counts the placeholders give, that is refused, not silently re-cropped."""
    from pp_media._cli.tiny_models import tiny_config
    from pp_media._hf.families import adapter_for

    _setup()
    config = tiny_config("llava_onevision")
    adapter = adapter_for(config)
    kind = adapter.media[0]
    batch = _batch(config, 12)
    counts = torch.tensor(_images_per_sample(batch, config))
    flat = dict(batch, batch_num_images=torch.ones(int(counts.sum()), dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_num_images"):
        adapter.tokens_per_item(config, kind, {**flat, "n_images_per_sample": counts})


# --- two gloo ranks ---------------------------------------------------------------------------


def _run_case(model_type: str, schedule: str, seed: int, videos: bool) -> dict[str, Any]:
    from pp_media._hf.pipeline import build_vlm_pipeline

    config, source = _model(model_type)
    reference = copy.deepcopy(source)
    batch = _batch(config, seed, videos)
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    full = dict(reference.named_parameters())
    ref_grads = {name: p.grad for name, p in full.items()}
    pipe = build_vlm_pipeline(
        source, schedule=schedule, n_microbatches=N_MICROBATCHES, device="cpu"
    )
    loss = pipe.step(dict(batch))
    named = dict(pipe.named_parameters(remove_duplicate=False))
    grad_err, grad_worst, _ = max_abs_diff(named, ref_grads, grads=True)
    # Missing: no gradient where the reference has one, even an all-zero one.
    missing = [name for name, p in named.items() if p.grad is None and ref_grads[name] is not None]
    return {
        "names": sorted(named),
        "full_names": sorted(full),
        "loss": None if loss is None else loss.item(),
        "ref_loss": ref_loss.item(),
        "grad_err": grad_err,
        "grad_worst": grad_worst,
        "missing": missing,
        "vision_grad": largest(
            ref_grads[name] for name in named if name.startswith("model.vision_tower.")
        ),
        "images": _images_per_sample(batch, config),
        "videos": placeholder_runs(batch["input_ids"], getattr(config, "video_token_id", -1)),
    }


def _key(model_type: str, schedule: str, seed: int, videos: bool) -> str:
    return f"{model_type}/{schedule}/{seed}" + ("/videos" if videos else "")


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every parity case, in order."""
    quiet_transformers()
    runs = ((_key(*case), partial(_run_case, *case)) for case in PARITY_CASES)
    run_cases_on_rank(rank, port, out_dir, runs, world_size=2)


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(
        worker,
        tmp_path_factory.mktemp("llava_next_parity"),
        world_size=2,
        timeout_s=TIMEOUT_S,
        what="the 2-rank run",
    )


@pytest.mark.parametrize(
    ("model_type", "schedule", "seed", "videos"),
    PARITY_CASES,
    ids=[_key(*case).replace("/", "-") for case in PARITY_CASES],
)
def test_pipelined_step_equals_the_unsplit_model(
    parity: list[dict[str, Any]], model_type: str, schedule: str, seed: int, videos: bool
) -> None:
    key = _key(model_type, schedule, seed, videos)
    per_rank = case_results(parity, key)
    images = per_rank[0]["images"]
    assert images[0] == 0 and max(images) >= 2 and 1 in images, images
    microbatches = _microbatches(images)
    if seed in (1, 9):
        assert [0, 0] in microbatches, "a text-only microbatch"
    if seed in (9, 12):
        assert any(1 in mb and max(mb) > 1 for mb in microbatches), "one image beside several"
    if videos:
        with_videos = [i for i, n in enumerate(per_rank[0]["videos"]) if n]
        assert with_videos and any(images[i] for i in with_videos), "videos beside images"
    (holder,) = [result for result in per_rank if result["loss"] is not None]
    loss_err = abs(holder["loss"] - holder["ref_loss"])
    assert loss_err <= LOSS_TOLERANCE, f"|loss - reference| = {loss_err:.3e}"
    for rank, result in enumerate(per_rank):
        assert result["grad_err"] <= GRAD_TOLERANCE, (
            f"rank {rank}: max |grad - reference| = {result['grad_err']:.3e} at "
            f"{result['grad_worst']}"
        )
        assert not result["missing"], f"rank {rank}: no gradient for {result['missing']}"
    held = [set(result["names"]) for result in per_rank]
    assert not held[0] & held[1] and held[0] | held[1] == set(per_rank[0]["full_names"])
    assert "model.image_newline" in held[0], "image_newline lives with the vision parts"
    assert per_rank[0]["vision_grad"] > 1000 * GRAD_TOLERANCE, "vision gradients worth checking"
    print(
        f"\n{key}: |loss diff| {loss_err:.2e}, max |grad diff| "
        f"{max(result['grad_err'] for result in per_rank):.2e}"
    )
