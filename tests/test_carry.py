"""The named carry schema (``pp_media._hf.carry``) and the stage-view hooks it comes with.

Liveness: a carry crosses the boundary before decoder layer ``c`` when it is produced before it
and read at or after it; ``pack`` lays the live ones out in schema order and refuses a missing
or wrongly shaped one by name, ``unpack`` names what a stage received. ``stage0_only_paths``
and ``stage_config``: the view of a later stage holds None at a stage-0-only path and the text
config the adapter gives it, and the source model is not changed.
"""

from __future__ import annotations

import re

import pytest
import torch

from pp_media._hf import carry
from pp_media._hf.carry import EMBEDDING, LOSS, Carry

H = 8
#: Position ids for every layer of 4, Qwen3-VL-style deepstack after layers 0 and 1, a key
#: produced by layer 1 for layer 3 (Gemma4's shared keys), and the router statistics.
SCHEMA = (
    carry.position_ids_carry(lambda c, b, s: (3, b, s), 4),
    *carry.deepstack_carries(2, H),
    Carry("kv.full", 1, (3,), lambda c, b, s: (b, 2, s, 4), grad=True),
    carry.router_stats_carry("router_stats", 9),
)


def _names(cut: int) -> list[str]:
    return [c.name for c in carry.live(SCHEMA, cut)]


def test_each_boundary_sends_what_later_layers_read_and_was_produced_before_it() -> None:
    assert _names(0) == [
        "position_ids",
        "visual_mask",
        "deepstack.0",
        "deepstack.1",
        "router_stats",
    ]
    assert _names(1) == ["position_ids", "visual_mask", "deepstack.1", "router_stats"]
    assert _names(2) == ["position_ids", "kv.full", "router_stats"]
    assert _names(3) == ["position_ids", "kv.full", "router_stats"]
    assert _names(4) == ["router_stats"]  # a last stage without decoder layers
    assert [c.name for c in carry.loss_carries(SCHEMA)] == ["router_stats"]
    assert SCHEMA[-1].producer == EMBEDDING and LOSS in SCHEMA[-1].consumers


def _named(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {
        "position_ids": torch.zeros(3, batch, seq, dtype=torch.int64),
        "visual_mask": torch.zeros(batch, seq, dtype=torch.int64),
        "deepstack.0": torch.zeros(batch, seq, H),
        "deepstack.1": torch.zeros(batch, seq, H),
        "kv.full": torch.randn(batch, 2, seq, 4),
        "router_stats": torch.zeros(9),
    }


def test_pack_and_unpack_round_trip_in_schema_order_with_the_gradient_rule() -> None:
    hidden = torch.zeros(2, 5, H)
    named = _named(2, 5)
    sent = carry.pack(SCHEMA, 2, named, None, hidden)
    assert [tuple(t.shape) for t in sent] == [(3, 2, 5), (2, 2, 5, 4), (9,)]
    # Carries with gradient are sent requiring it (a leaf if need be), the others detached.
    assert [t.requires_grad for t in sent] == [False, True, True]
    received = carry.unpack(SCHEMA, 2, sent)
    assert list(received) == ["position_ids", "kv.full", "router_stats"]
    assert torch.equal(received["kv.full"], named["kv.full"])


def test_a_missing_or_misshapen_carry_is_refused_by_name() -> None:
    hidden = torch.zeros(2, 5, H)
    named = _named(2, 5)
    del named["kv.full"]
    with pytest.raises(ValueError) as missing:
        carry.pack(SCHEMA, 2, named, None, hidden)
    assert str(missing.value) == (
        "pp_media: the stage before decoder layer 2 must send the carry 'kv.full' (produced by "
        "layer 1, read by ['layer 3']) but has none. The family adapter's carries and what its "
        "stages produce disagree."
    )
    named = _named(2, 5)
    named["deepstack.1"] = torch.zeros(1, 5, H)
    with pytest.raises(ValueError) as misshapen:
        carry.pack(SCHEMA, 1, named, None, hidden)
    assert str(misshapen.value) == (
        "pp_media: the carry 'deepstack.1' has shape [1, 5, 8] and dtype torch.float32 in a "
        "microbatch of 2 x 5 tokens; expected [2, 5, 8] and torch.float32. Every microbatch "
        "must send a dense tensor of one fixed shape (torch's stages size their receive "
        "buffers from microbatch 0)."
    )
    with pytest.raises(ValueError, match=re.escape("received 2 tensors after the hidden")):
        carry.unpack(SCHEMA, 2, [torch.zeros(1), torch.zeros(1)])


def test_stage0_only_paths_and_stage_config_shape_the_later_stages_views() -> None:
    transformers = pytest.importorskip("transformers")
    from pp_media._hf.families.qwen_vl import QwenVLAdapter
    from pp_media._hf.pipeline import check_partition
    from pp_media._hf.pruning import prune_to_stage
    from pp_media.testing import tiny_config

    class FullConfigAdapter(QwenVLAdapter):
        """Qwen2-VL with its text model's rotary embedding declared stage-0-only (a stand-in
        for Gemma4's per-layer embeddings) and the full text config on every stage."""

        stage0_only_paths = ("model.language_model.rotary_emb",)

        def stage_config(self, config: object, layers: tuple[int, ...]) -> object:
            return config

    config = tiny_config("qwen2_vl")
    model = transformers.AutoModelForImageTextToText.from_config(config)
    text_config = model.model.language_model.config
    path = "model.language_model.rotary_emb"
    adapter = FullConfigAdapter()
    first = prune_to_stage(model, adapter, (0, 1), True, False)
    later = prune_to_stage(model, adapter, (2, 3), False, True)
    assert first.get_submodule(path) is model.get_submodule(path)
    assert later.get_submodule("model.language_model")._modules["rotary_emb"] is None
    assert model.get_submodule(path) is not None, "the source model is unchanged"
    assert later.get_submodule("model.language_model").config is text_config
    # The default cuts the per-layer settings to the stage's layers.
    default = prune_to_stage(model, QwenVLAdapter(), (2, 3), False, True)
    assert default.get_submodule("model.language_model").config.num_hidden_layers == 2
    assert text_config.num_hidden_layers == 4
    check_partition(model, [first, default])


def test_the_router_mask_zeroes_exactly_the_rows_that_pad_microbatches() -> None:
    """6 samples in 4 microbatches: [0, 2), [2, 4), [4, 5) + a pad row, [5, 6) + a pad row.
    Pad rows have attention mask 1 (no fully masked attention row); the router statistics must
    not count them, the samples' own padding stays as their attention mask says."""
    from pp_media._core.padding import pad_to_even_microbatches
    from pp_media._hf.router_pipeline import router_mask

    mask = torch.ones(6, 3, dtype=torch.int64)
    mask[1, 2] = 0
    text = {"input_ids": torch.zeros(6, 3, dtype=torch.int64), "attention_mask": mask}
    assert router_mask(text, text["input_ids"], 6, 3) is None  # 3 divides 6: no pad rows
    pad_to_even_microbatches(text, 6, 4)
    assert text["attention_mask"][:, 0].tolist() == [1] * 8
    rows = router_mask(text, text["input_ids"], 6, 4)
    assert rows[:, 0].tolist() == [1, 1, 1, 1, 1, 0, 1, 0]
    assert rows[1].tolist() == [1, 1, 0]
    without = router_mask({}, text["input_ids"], 6, 4)
    assert without.tolist() == [[1, 1, 1]] * 5 + [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
