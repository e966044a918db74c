"""Adapter facts of the MoE families that the parity rows cannot show on their own.

``router(layer)`` must name, layer by layer, exactly the module whose output transformers
records as ``router_logits`` (``OutputRecorder`` in the text model's ``_can_record_outputs``)
and its output index, and None for the dense layers; built on the meta device, so no weights
are drawn. MiniMax-M3-VL's layout stand-in must lay out patches exactly as the Qwen-VL
processors do (MiniMax's own ``patchify`` is that code; it needs torchvision, the Qwen2-VL PIL
processor does not).

ERNIE-4.5-VL: ``router`` names what transformers records as ``router_logits`` (the MoeBlock's
output 1, sparse layers only), and ``moe_mm_token_type_ids`` derived for a collate that leaves
it out is the processor's own. Llama 4: no layer has a router loss, and the unsplit reference
(``pp_media.testing.reference_loss``) is exactly the loss ``Llama4ForConditionalGeneration.
forward`` computes before it fails in transformers 5.24 (read from the failing frame).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pp_media._hf.checkpoint import _model_factory
from pp_media._hf.families import adapter_for
from pp_media._hf.router_loss import recording_router_logits
from pp_media.testing import (
    MergedPatchLayout,
    default_seq_len,
    reference_loss,
    synthetic_batch,
    tiny_config,
)


@functools.cache
def _model_and_batch(model_type: str) -> tuple[Any, dict[str, torch.Tensor]]:
    import transformers

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).train()
    batch = synthetic_batch(config, 6, default_seq_len(config), seed=1)
    return model, batch


def test_ernie_router_is_what_transformers_records_as_router_logits() -> None:
    model, batch = _model_and_batch("ernie4_5_vl_moe")
    adapter = adapter_for(model.config)
    layers = model.model.language_model.layers
    routers = [adapter.router(layer) for layer in layers]
    sparse = [kind == "sparse" for kind in model.config.text_config.mlp_layer_types]
    assert [entry is not None for entry in routers] == sparse and not all(sparse)
    assert all(
        entry == (layer.mlp, 1) for entry, layer in zip(routers, layers, strict=True) if entry
    )
    modules = [entry[0] for entry in routers if entry is not None]
    with torch.no_grad(), recording_router_logits(modules, 1) as recorded:
        out = model(**batch, output_router_logits=True)
    assert len(recorded) == len(out.router_logits) == sum(sparse)
    assert all(
        torch.equal(mine, theirs) for mine, theirs in zip(recorded, out.router_logits, strict=True)
    )
    # The batch has vision tokens: their rows came from the vision experts' router.
    assert batch["moe_mm_token_type_ids"].any()


def test_ernie_derives_moe_token_types_by_the_processors_rule() -> None:
    """``step_fields`` without ``moe_mm_token_type_ids``: the processor's
    ``create_moe_mm_token_type_ids`` on the same ids (its token ids from the model config)."""
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeProcessor,
    )

    model, batch = _model_and_batch("ernie4_5_vl_moe")
    config = model.config
    adapter = adapter_for(config)
    names = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id")
    names += ("video_start_token_id", "video_end_token_id")
    processor = SimpleNamespace(**{name: getattr(config, name) for name in names})
    expected = torch.tensor(
        Ernie4_5_VLMoeProcessor.create_moe_mm_token_type_ids(processor, batch["input_ids"].tolist())
    )
    given = {k: v for k, v in batch.items() if k != "moe_mm_token_type_ids"}
    derived = adapter.step_fields(config, given, has_media=True)["moe_mm_token_type_ids"]
    assert torch.equal(derived, expected.to(derived.dtype))
    assert set(derived.unique().tolist()) == {0, 1}
    assert adapter.text_model_fields({"moe_mm_token_type_ids": derived}) == {
        "moe_mm_token_type_ids": derived
    }


def test_llama4_has_no_router_loss() -> None:
    model, _ = _model_and_batch("llama4")
    adapter = adapter_for(model.config)
    layers = model.language_model.model.layers
    assert [adapter.router(layer) for layer in layers] == [None] * len(layers)
    assert any(layer.is_moe_layer for layer in layers)


def test_llama4_reference_is_the_loss_forward_computes_before_it_fails() -> None:
    """transformers 5.24's forward computes ``loss`` and then raises reading
    ``outputs.image_outputs`` (modeling_llama4.py:1318); its frame still holds that loss."""
    model, batch = _model_and_batch("llama4")
    inputs = {k: v for k, v in batch.items() if k != "aspect_ratios"}
    assert inputs["pixel_values"].shape[0] > 1
    try:
        model(**inputs)
    except AttributeError as error:
        assert "image_outputs" in str(error)
        traceback = error.__traceback__
        while traceback.tb_next is not None:
            traceback = traceback.tb_next
        frame = traceback.tb_frame
        assert frame.f_code.co_filename.endswith("modeling_llama4.py")
        computed = frame.f_locals["loss"]
    else:  # fixed upstream: then the reference must be the forward itself again
        raise AssertionError("Llama4ForConditionalGeneration.forward runs now")
    assert torch.equal(reference_loss(model, inputs).detach(), computed.detach())


#: Model type, text-config changes, and the decoder layers that must have no router.
ROUTER_CASES = [
    ("qwen3_5_moe", {}, []),
    ("glm4v_moe", {}, [0]),  # first_k_dense_replace 1
    ("minimax_m3_vl", {}, [0]),  # mlp_layer_types[0] == "dense"
    ("qwen3_omni_moe_thinker", {}, []),
    ("qwen3_omni_moe_thinker", {"mlp_only_layers": [1]}, [1]),
    ("qwen3_omni_moe_thinker", {"decoder_sparse_step": 2}, [0, 2]),
]


def _meta_model(model_type: str, text_changes: dict[str, Any]) -> Any:
    config = tiny_config(model_type)
    for name, value in text_changes.items():
        setattr(config.get_text_config(), name, value)
    with torch.device("meta"):
        return _model_factory(config)(config)


@pytest.mark.parametrize(
    ("model_type", "text_changes", "dense"),
    ROUTER_CASES,
    ids=[f"{t}-{'-'.join(c) or 'tiny'}" for t, c, _ in ROUTER_CASES],
)
def test_router_hook_names_what_transformers_records(
    model_type: str, text_changes: dict[str, Any], dense: list[int]
) -> None:
    model = _meta_model(model_type, text_changes)
    adapter = adapter_for(model.config)
    text = model.get_submodule(adapter.text_model_path)
    recorder = type(text)._can_record_outputs["router_logits"]
    found = [adapter.router(layer) for layer in text.layers]
    assert [i for i, hook in enumerate(found) if hook is None] == dense
    recorded = [m for m in text.layers.modules() if isinstance(m, recorder.target_class)]
    hooked = [module for module, _ in filter(None, found)]
    assert len(hooked) == len(recorded) == len(text.layers) - len(dense)
    assert all(mine is theirs for mine, theirs in zip(hooked, recorded, strict=True))
    assert {index for _, index in filter(None, found)} == {recorder.index}


def test_the_merged_patch_stand_in_has_the_qwen_vl_processors_layout() -> None:
    """Same rows in the same order as ``Qwen2VLImageProcessorPil`` without resizing or
    normalisation, up to the stand-in's scaling to [-1, 1]; the same grids."""
    import transformers
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(
            torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for h, w in ((56, 84), (112, 56))
    ]
    stand_in = MergedPatchLayout(patch_size=14, merge_size=2, temporal_patch_size=2)(images)
    real = transformers.Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, do_resize=False, do_normalize=False
    )(images=images, return_tensors="pt")
    assert torch.equal(stand_in["image_grid_thw"], real["image_grid_thw"])
    assert stand_in["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    torch.testing.assert_close(stand_in["pixel_values"], real["pixel_values"] * 2 - 1)


def test_a_thinker_batch_with_audio_is_refused_by_name() -> None:
    """Audio is left out of the thinker's pipeline: its fields or placeholders in a batch are
    refused before anything runs (a step would drop them silently otherwise)."""
    from pp_media._hf.batch import prepare_step_inputs
    from pp_media.testing import synthetic_batch

    config = tiny_config("qwen3_omni_moe_thinker")
    adapter = adapter_for(config)
    batch = synthetic_batch(config, 4, 48, seed=1, max_images=1)
    prepare_step_inputs(batch, adapter, config, 2)  # images only: accepted
    with_audio = {**batch, "input_features": torch.zeros(1, 16, 8)}
    with pytest.raises(ValueError) as refused:
        prepare_step_inputs(with_audio, adapter, config, 2)
    assert str(refused.value) == (
        "pp_media: the batch holds audio (input_features; 0 audio placeholder tokens, id 989) "
        "but the qwen3_omni_moe_thinker pipeline takes images and videos only; leave the audio "
        "out of the processor's inputs."
    )
    placeholders = batch["input_ids"].clone()
    placeholders[0, 0] = config.audio_token_id
    with pytest.raises(ValueError, match=r"\(no audio fields; 1 audio placeholder tokens"):
        prepare_step_inputs({**batch, "input_ids": placeholders}, adapter, config, 2)
    assert "input_features" not in batch
