"""Model facts of the ernie4_5_vl_moe and llama4 adapters that the parity run relies on.

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

import torch

from pp_media._hf.families import adapter_for
from pp_media._hf.router_loss import recording_router_logits
from pp_media.testing import default_seq_len, reference_loss, synthetic_batch, tiny_config


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
