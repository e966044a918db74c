"""Single-process checks of the model side: partition completeness, one-line errors, the
per-step batch preparation (derived counts and token types, padding, fixed shapes)."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pp_media._hf.batch import prepare_step_inputs  # noqa: E402
from pp_media._hf.families import LlavaAdapter, adapter_for, supported_model_types  # noqa: E402
from pp_media._hf.partition import plan_stages  # noqa: E402
from pp_media._hf.pipeline import VLMPipeline, build_vlm_pipeline, check_partition  # noqa: E402
from pp_media._hf.pruning import prune_to_stage  # noqa: E402
from pp_media.testing import (  # noqa: E402
    default_seq_len,
    synthetic_batch,
    tiny_config,
)


def _views(model: torch.nn.Module, adapter: object, n_stages: int = 2) -> list[torch.nn.Module]:
    layout = plan_stages("GPipe", n_stages, 4)
    last = layout.n_stages - 1
    return [
        prune_to_stage(model, adapter, layout.layers[s], s == 0, s == last)
        for s in range(layout.n_stages)
    ]


def test_stage_views_hold_every_parameter_once_under_the_model_names() -> None:
    config = tiny_config("llava")
    model = transformers.AutoModelForImageTextToText.from_config(config)
    views = _views(model, adapter_for(config))
    check_partition(model, views)
    names = [name for view in views for name, _ in view.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert "model.language_model.layers.3.mlp.up_proj.weight" in dict(views[1].named_parameters())
    # The source model is left whole.
    assert len(model.model.language_model.layers) == 4


def test_an_adapter_that_misses_a_part_is_refused() -> None:
    class NoProjector(LlavaAdapter):
        vision_paths = ("model.vision_tower",)

    config = tiny_config("llava")
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ValueError) as error:
        check_partition(model, _views(model, NoProjector()))
    assert str(error.value).startswith(
        "pp_media: the stage split does not hold every parameter exactly once; missing "
        "['model.multi_modal_projector.linear_1.bias'"
    )
    assert str(error.value).endswith("The family adapter's part paths are wrong.")


def test_unknown_family_lists_the_supported_ones() -> None:
    config = transformers.BertConfig()
    with pytest.raises(ValueError) as error:
        adapter_for(config)
    assert str(error.value) == (
        "pp_media: no stage-splitting adapter for model_type 'bert'; supported: "
        f"{', '.join(supported_model_types())}. A family is a small FamilyAdapter subclass "
        "passed to pp_media.register_family."
    )


def test_build_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match=re.escape("needs an initialised process group")):
        build_vlm_pipeline(
            transformers.AutoModelForImageTextToText.from_config(tiny_config("llava"))
        )


def test_step_inputs_derive_counts_and_token_types_and_pad_every_microbatch() -> None:
    config = tiny_config("qwen2_vl")
    adapter = adapter_for(config)
    batch = synthetic_batch(config, 6, default_seq_len(config), seed=3)
    given = batch.pop("mm_token_type_ids")
    before = {name: value.clone() for name, value in batch.items()}
    inputs = prepare_step_inputs(batch, adapter, config, 4)
    # Caller's batch untouched; microbatches of 2, 2, 1, 1 padded to 2 rows each.
    assert all(torch.equal(batch[name], before[name]) for name in before)
    assert inputs.input_ids.shape == (8, batch["input_ids"].shape[1])
    rows = [0, 1, 2, 3, 4, 6]  # where the engine's split of the padded batch puts each sample
    assert torch.equal(inputs.input_ids[rows], batch["input_ids"])
    assert torch.equal(inputs.kwargs["mm_token_type_ids"][rows], given.to(torch.int32))
    assert (inputs.labels[[5, 7]] == -100).all()
    assert inputs.label_tokens == int((batch["labels"][:, 1:] != -100).sum())
    counts = torch.cat(inputs.media["n_images_per_sample"])
    placeholders = (batch["input_ids"] == config.image_token_id).sum(1)
    tokens = batch["image_grid_thw"].prod(-1) // 4
    sums = torch.stack([chunk.sum() for chunk in tokens.split(counts.tolist())])
    assert torch.equal(sums, placeholders)


def test_batches_of_another_microbatch_shape_than_the_first_are_refused() -> None:
    """The rule is the padded microbatch shape [ceil(B / M), T]: B may vary while it holds."""
    config = tiny_config("llava")
    pipe = VLMPipeline([], None, None, adapter_for(config), config, None, None, 4, "cpu")
    pipe.prepare(synthetic_batch(config, 6, 96, seed=0))
    for batch_size in (5, 8):  # ceil(B / 4) = 2 as for B = 6: accepted
        pipe.prepare(synthetic_batch(config, batch_size, 96, seed=batch_size))
    with pytest.raises(ValueError) as error:
        pipe.prepare(synthetic_batch(config, 6, 112, seed=1))
    assert str(error.value) == (
        "pp_media: this batch (6 samples x 112 tokens) gives microbatches of [2, 112] tokens but "
        "the pipeline was set up for [2, 96] by its first batch: torch's stages fix their "
        "receive buffers at the first step, so every batch must give the same padded "
        "microbatch shape [ceil(B / 4), T]. Pad every batch to T = 96 tokens; the batch size B "
        "may vary as long as ceil(B / 4) stays 2 (B from 5 to 8)."
    )
    with pytest.raises(
        ValueError, match=re.escape("(9 samples x 96 tokens) gives microbatches of [3, 96]")
    ):
        pipe.prepare(synthetic_batch(config, 9, 96, seed=9))


def test_media_a_collate_prepared_and_padded_are_refused_with_the_fix() -> None:
    import pp_media

    config = tiny_config("qwen2_vl")
    batch = synthetic_batch(config, 6, default_seq_len(config), seed=3)
    batch["n_images_per_sample"] = pp_media.count_items_per_sample(
        batch["input_ids"], config.image_token_id, batch["image_grid_thw"].prod(-1) // 4
    )
    wrapped = pp_media.wrap_vlm_collate_for_pp(lambda b: dict(b), 4, even_microbatches=True)
    padded = wrapped(batch)
    with pytest.raises(ValueError) as error:
        prepare_step_inputs(padded, adapter_for(config), config, 4)
    assert str(error.value) == (
        "pp_media: the batch's '_vlm_pp_media_chunks' was prepared for 4 microbatches of 6 "
        "samples, but the pipeline runs 4 microbatches of this 8-row batch. Pass the collate "
        "function's output without prepare_vlm_media_for_pp / even_microbatches: "
        "VLMPipeline.step splits and pads it itself."
    )
    # Prepared for this batch (no padding): accepted, same step inputs as the raw batch.
    prepared = pp_media.wrap_vlm_collate_for_pp(lambda b: dict(b), 4)(batch)
    from_prepared = prepare_step_inputs(prepared, adapter_for(config), config, 4)
    from_raw = prepare_step_inputs(batch, adapter_for(config), config, 4)
    assert torch.equal(from_prepared.input_ids, from_raw.input_ids)
    for name, chunks in from_raw.media.items():
        assert all(
            torch.equal(a, b) for a, b in zip(chunks, from_prepared.media[name], strict=True)
        )
