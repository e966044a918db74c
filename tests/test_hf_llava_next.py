"""LLaVA-NeXT and LLaVA-OneVision: anyres crops ``[n_images, max_crops, C, H, W]``, ``image_sizes``.

Tiny random models (``pp_media.testing``: 56-pixel crops, pinpoints up to 2x2 crops) and their
real image processors (PIL backend) build ``synthetic_batch`` batches of 6 samples with 0..3
images of several sizes (sample 0 text-only). No batch carries ``n_images_per_sample``: the
pipeline derives it from the placeholders.

Single process: each image's placeholder count (``tokens_per_item``, the processor's own rule)
equals the length of its features from the model's own ``get_image_features``, the unsplit
forward accepts the batch, and per microbatch the adapter's features (OneVision: with
``batch_num_images`` rebuilt for the microbatch's samples) fill exactly its placeholders.

Their 2-rank parity cases (LLaVA-NeXT under 1F1B, OneVision under 1F1B and Interleaved1F1B, and
with videos) are rows of the one parity harness, ``test_hf_parity.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.parity import placeholder_runs, quiet_transformers

BATCH_SIZE = 6
N_MICROBATCHES = 4
#: (family, batch seed). Images per sample (``synthetic_batch``'s draw; microbatches of
#: 2, 2, 1, 1 samples): seed 1 [0, 3, 0, 0, 3, 1] (a text-only microbatch), seed 12
#: [0, 3, 2, 1, 1, 2] and seed 9 [0, 0, 2, 1, 2, 0] (a microbatch with a sample of one image
#: beside one of two, so OneVision's per-microbatch ``batch_num_images`` differs from the
#: batch's, and text-only microbatches).
UNIT_CASES = (("llava_next", 1), ("llava_onevision", 12), ("llava_onevision", 9))


def _setup() -> None:
    torch.set_num_threads(1)
    quiet_transformers()


def _model(model_type: str) -> tuple[Any, Any]:
    import transformers

    from pp_media.testing import tiny_config

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.train()
    return config, model


def _batch(config: Any, seed: int, videos: bool = False) -> dict[str, torch.Tensor]:
    from pp_media.testing import default_seq_len, synthetic_batch

    seq_len = default_seq_len(config, videos=videos)
    return synthetic_batch(config, BATCH_SIZE, seq_len, seed=seed, videos=videos)


def _images_per_sample(batch: dict[str, torch.Tensor], config: Any) -> list[int]:
    """Placeholder runs per sample (the synthetic rows put text between images)."""
    return placeholder_runs(batch["input_ids"], config.image_token_id)


# --- single process -----------------------------------------------------------------------


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
    from pp_media._hf.families import adapter_for
    from pp_media.testing import tiny_config

    _setup()
    config = tiny_config("llava_onevision")
    adapter = adapter_for(config)
    kind = adapter.media[0]
    batch = _batch(config, 12)
    counts = torch.tensor(_images_per_sample(batch, config))
    flat = dict(batch, batch_num_images=torch.ones(int(counts.sum()), dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_num_images"):
        adapter.tokens_per_item(config, kind, {**flat, "n_images_per_sample": counts})
