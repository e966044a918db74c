"""What a new user's own batches and options meet before any process group: required media
fields per family, derived counts that fail, the reference batch, small vocabularies and the
``dtype`` option (single process)."""

from __future__ import annotations

import functools
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pp_media._hf.batch import prepare_step_inputs, reference_batch  # noqa: E402
from pp_media._hf.dtypes import resolve_dtype  # noqa: E402
from pp_media._hf.families import adapter_for  # noqa: E402
from pp_media._hf.pipeline import build_vlm_pipeline  # noqa: E402
from pp_media.testing import (  # noqa: E402
    IMAGE_TOKEN,
    builds_videos,
    default_seq_len,
    synthetic_batch,
    text_token_ids,
    tiny_config,
    tiny_model_types,
)

#: Batch fields that are text, or the pixels themselves.
_TEXT = {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "token_type_ids"}


@functools.cache
def _cached_family_batch(model_type: str) -> tuple[object, dict[str, torch.Tensor]]:
    config = tiny_config(model_type)
    adapter = adapter_for(config)
    videos = len(adapter.media) > 1 and model_type != "glm4v" and builds_videos(config)
    seq_len = default_seq_len(config, videos=videos)
    return config, synthetic_batch(config, 6, seq_len, seed=3, videos=videos)


def _family_batch(model_type: str) -> tuple[object, dict[str, torch.Tensor]]:
    """The family's synthetic batch (built once per family: the processors are slow)."""
    config, batch = _cached_family_batch(model_type)
    return config, dict(batch)


@pytest.mark.parametrize("model_type", tiny_model_types())
def test_each_family_refuses_a_batch_without_a_required_media_field_by_name(
    model_type: str,
) -> None:
    """Every media field but the pixels is either declared required (and then its absence is
    a ValueError naming it, the batch untouched) or optional (the step accepts the batch
    without it); no bare KeyError from a family's placeholder rule reaches the caller."""
    config, batch = _family_batch(model_type)
    adapter = adapter_for(config)
    pixels = {kind.pixel_field for kind in adapter.media}
    required = {
        needed: present
        for kind in adapter.media
        for present, needed in [(kind.pixel_field, n) for n in kind.requires]
        + list(kind.requires_with)
        if present in batch
    }
    for name in sorted(set(batch) - _TEXT - pixels):
        without = {key: value for key, value in batch.items() if key != name}
        before = {key: value.clone() for key, value in without.items()}
        if name in required:
            present = required[name]
            message = (
                f"pp_media: the batch has '{present}' (shape {tuple(batch[present].shape)}, "
                f"dtype {batch[present].dtype}) but no '{name}', which {model_type} needs with "
                f"its "
            )
            with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
                prepare_step_inputs(without, adapter, config, 4)
            assert all(torch.equal(without[key], before[key]) for key in before)
        else:
            try:
                prepare_step_inputs(without, adapter, config, 4)
            except ValueError as error:  # a clear refusal of the pp_media kind is fine
                assert str(error).startswith("pp_media: "), (name, error)


@pytest.mark.parametrize(
    ("model_type", "field"),
    [
        ("qwen2_vl", "image_grid_thw"),
        ("qwen2_vl", "video_grid_thw"),
        ("kimi_k25", "image_grid_thw"),
        ("llava_next", "image_sizes"),
        ("mistral3", "image_sizes"),
        ("internvl", "num_patches"),
        ("inkling_mm_model", "num_patches"),
        ("step3p7", "num_local_patches"),
        ("gemma4", "image_position_ids"),
        ("gemma4", "video_position_ids"),
        ("gemma4", "num_frames_per_video"),
    ],
)
def test_the_fields_each_family_declares_required(model_type: str, field: str) -> None:
    """The declared fields; without the check each of these was a bare KeyError (or, for
    Step3p7, an error naming the core's renamed fields)."""
    config, batch = _family_batch(model_type)
    assert field in batch
    del batch[field]
    with pytest.raises(ValueError, match=f"but no '{field}', which {model_type} needs"):
        prepare_step_inputs(batch, adapter_for(config), config, 4)


def test_gemma4_frame_counts_that_miss_the_frame_rows_are_refused_by_name() -> None:
    """Gemma4's placeholder rule sums each video's frames: counts that do not cover the frame
    rows name the field before any split, and the batch is left as it was."""
    config, batch = _family_batch("gemma4")
    frames = batch["num_frames_per_video"]
    rows = int(frames.sum())
    batch["num_frames_per_video"] = frames + torch.tensor([1, 0])
    before = dict(batch)
    message = (
        f"pp_media: 'num_frames_per_video' (shape (2,), dtype torch.int64): expected "
        f"non-negative frame counts that sum to {rows}, the frame rows of 'video_position_ids' "
        f"(shape ({rows}, 280, 2)). They sum to {rows + 1}; pass the counts the video "
        "processor emitted."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        prepare_step_inputs(batch, adapter_for(config), config, 4)
    assert batch.keys() == before.keys() and all(batch[k] is v for k, v in before.items())


QWEN = tiny_config("qwen2_vl")


def _qwen_batch() -> dict[str, torch.Tensor]:
    return synthetic_batch(QWEN, 6, default_seq_len(QWEN), seed=0)


def _drop_placeholder(batch: dict[str, torch.Tensor], sample: int) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"].clone()
    ids[sample, int((ids[sample] == IMAGE_TOKEN).nonzero()[0, 0])] = 5
    return {**batch, "input_ids": ids}


def test_derived_counts_that_fail_name_the_microbatch_and_the_sample() -> None:
    batch = _drop_placeholder(_qwen_batch(), 4)
    found = int((batch["input_ids"][4] == IMAGE_TOKEN).sum())
    tokens = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    placeholders = (batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    first, seen = 0, 0  # the images of samples 0-3, which still match
    while seen < sum(placeholders[:4]):
        seen += tokens[first]
        first += 1
    options = " or ".join(
        f"{sum(tokens[first : first + n])} ({n} image{'s' if n > 1 else ''})"
        for n in range(1, len(tokens) - first + 1)
        if sum(tokens[first : first + n - 1]) < found
    )
    message = (
        f"pp_media: microbatch 2, sample 4 of the batch: {found} image placeholder tokens (id "
        f"{IMAGE_TOKEN}) in input_ids are not whole images: the next images in order give "
        f"{options} features. Without 'n_images_per_sample' in the batch, images go to samples "
        "in order by their placeholder tokens"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        prepare_step_inputs(batch, adapter_for(QWEN), QWEN, 4)


def test_images_left_over_after_the_last_sample_are_reported() -> None:
    batch = _qwen_batch()
    last = max(i for i in range(6) if (batch["input_ids"][i] == IMAGE_TOKEN).any())
    ids = batch["input_ids"].clone()
    ids[last][ids[last] == IMAGE_TOKEN] = 5  # every placeholder of the last image sample
    with pytest.raises(ValueError, match=r"left over after the last sample \(microbatch 3"):
        prepare_step_inputs({**batch, "input_ids": ids}, adapter_for(QWEN), QWEN, 4)


def test_reference_batch_derives_what_the_step_derives() -> None:
    """``model(**reference_batch(batch)).loss`` is the loss of the batch with the derived
    fields (Qwen's ``mm_token_type_ids``), and the alignment-only counts are left out."""
    batch = _qwen_batch()
    given = batch.pop("mm_token_type_ids")
    batch["n_images_per_sample"] = torch.ones(6, dtype=torch.int64)  # not a model input
    reference = reference_batch(batch, adapter_for(QWEN), QWEN)
    assert "n_images_per_sample" not in reference and "n_images_per_sample" in batch
    assert "mm_token_type_ids" not in batch
    assert torch.equal(reference["mm_token_type_ids"], given.to(torch.int32))
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(QWEN)
    with torch.no_grad():
        expected = model(
            **{k: v for k, v in batch.items() if k != "n_images_per_sample"},
            mm_token_type_ids=given,
        ).loss
        assert model(**reference).loss.item() == expected.item()
    with pytest.raises(ValueError, match="already split into '_vlm_pp_media_chunks'"):
        reference_batch({**batch, "_vlm_pp_media_chunks": {}}, adapter_for(QWEN), QWEN)


def _small_vocab_config() -> object:
    config = tiny_config("qwen2_vl")
    config.text_config.vocab_size = 300
    config.image_token_id, config.video_token_id = 290, 291
    config.vision_start_token_id, config.vision_end_token_id = 292, 293
    return config


def test_synthetic_text_stays_inside_a_small_vocabulary() -> None:
    """``pp-media demo --model DIR`` with a vocabulary under 900 tokens: its synthetic text
    used to draw ids up to 899 and the embedding raised IndexError."""
    config = _small_vocab_config()
    batch = synthetic_batch(config, 6, default_seq_len(config, videos=True), seed=0, videos=True)
    assert int(batch["input_ids"].max()) < 300
    text = batch["input_ids"][batch["attention_mask"] == 1]
    specials = {290, 291, 292, 293}
    placeholders = (batch["input_ids"] == 290).sum(1)
    assert int(placeholders.sum()) == int((batch["image_grid_thw"].prod(-1) // 4).sum())
    assert set(text.tolist()) - specials <= set(range(10, 300))
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    assert torch.isfinite(model(**batch).loss)


def test_a_vocabulary_with_no_ordinary_token_is_refused() -> None:
    config = tiny_config("llava")
    config.text_config.vocab_size = 2
    config.text_config.pad_token_id, config.text_config.bos_token_id = 0, 1
    with pytest.raises(ValueError, match="has no id left for synthetic text"):
        text_token_ids(config)


def test_dtype_accepts_torch_dtypes_and_their_names_and_refuses_the_rest() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    assert resolve_dtype(None) is None
    for bad in ("bf16", "int8", 3):
        with pytest.raises(ValueError) as error:
            resolve_dtype(bad)  # type: ignore[arg-type]
        assert str(error.value) == (
            f"pp_media: dtype {bad!r} is not a floating-point torch dtype; pass one such as "
            "torch.bfloat16 or its name: 'bfloat16', 'float16', 'float32'."
        )
    # Refused up front, before the process group is even looked for.
    with pytest.raises(ValueError, match="dtype 'bf16' is not"):
        build_vlm_pipeline(torch.nn.Linear(1, 1), dtype="bf16")
