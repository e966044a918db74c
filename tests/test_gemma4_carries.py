"""Gemma4's carry schema from its config alone (single process): what crosses which stage
boundary, with which shape, and what a stage holds. The 2-rank parity of these carries is in
``test_hf_parity`` (``hf_parity_worker``'s gemma4 rows)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from pp_media._hf.carry import EMBEDDING, live  # noqa: E402
from pp_media._hf.families import adapter_for  # noqa: E402
from pp_media._hf.pruning import prune_to_stage  # noqa: E402
from pp_media.testing import tiny_config  # noqa: E402

B, T = 2, 24


def _schema(config: object) -> list[tuple[str, int, tuple[int, ...], tuple[int, ...], bool]]:
    return [
        (carry.name, carry.producer, carry.consumers, tuple(carry.shape(config, B, T)), carry.grad)
        for carry in adapter_for(config).carries(config)
    ]


def test_the_tiny_gemma4_sends_per_layer_inputs_and_each_types_keys_and_values() -> None:
    """Layers 0 (sliding) and 1 (full) store what layers 2 and 3 reuse; full layers have their
    own head size (``global_head_dim`` 32 against 16) from ``per_layer_config``."""
    config = tiny_config("gemma4")
    per_layer = [(f"per_layer_input.{i}", EMBEDDING, (i,), (B, T, 8), True) for i in range(4)]
    assert _schema(config) == [
        *per_layer,
        ("kv.sliding_attention.key", 0, (2,), (B, 2, T, 16), True),
        ("kv.sliding_attention.value", 0, (2,), (B, 2, T, 16), True),
        ("kv.full_attention.key", 1, (3,), (B, 2, T, 32), True),
        ("kv.full_attention.value", 1, (3,), (B, 2, T, 32), True),
    ]
    schema = adapter_for(config).carries(config)
    assert [c.name for c in live(schema, 1)] == [
        "per_layer_input.1",
        "per_layer_input.2",
        "per_layer_input.3",
        "kv.sliding_attention.key",
        "kv.sliding_attention.value",
    ]
    assert [c.name for c in live(schema, 3)] == [
        "per_layer_input.3",
        "kv.full_attention.key",
        "kv.full_attention.value",
    ]


def test_only_the_types_that_reuse_layers_read_are_carried() -> None:
    """6 layers, the last one sharing: only the full-attention keys and values of layer 3
    (the last non-shared full layer) travel; the sliding layers' stored ones are read by no
    layer. Without per-layer inputs (``hidden_size_per_layer_input`` 0) none are sent."""
    config = tiny_config("gemma4", num_layers=6)
    text = config.get_text_config()
    text.num_kv_shared_layers = 1
    text.hidden_size_per_layer_input = 0
    assert text.kv_sharing_modes == [None, None, None, "store", "store", "reuse"]
    assert _schema(config) == [
        ("kv.full_attention.key", 3, (5,), (B, 2, T, 32), True),
        ("kv.full_attention.value", 3, (5,), (B, 2, T, 32), True),
    ]


def test_gemma4_stages_keep_the_full_config_and_stage_0_the_per_layer_input_tables() -> None:
    config = tiny_config("gemma4")
    adapter = adapter_for(config)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    first = prune_to_stage(model, adapter, [0, 1], True, False)
    later = prune_to_stage(model, adapter, [2, 3], False, True)
    for view in (first, later):
        text = view.get_submodule(adapter.text_model_path)
        assert text.config is model.config.get_text_config()
    tables = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")
    held = {name for name, _ in first.named_parameters()}
    later_held = {name for name, _ in later.named_parameters()}
    for table in tables:
        name = f"model.language_model.{table}.weight"
        assert name in held and name not in later_held, name
