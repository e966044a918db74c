"""The router load-balancing loss accumulated stage by stage equals transformers' own.

For every MoE family whose tiny model trains on CPU (``pp_media/testing/_moe_survey.py``): one
forward with ``output_router_logits=True``; the recorded router logits split into 2 or 3 groups
of layers ("stages"), each group added onto the running ``[2E + 1]`` stats tensor, give exactly
``load_balancing_loss_func`` of the family's transformers module, the model's ``aux_loss`` and
the same gradient with respect to every layer's router logits; with and without padding.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import pytest
import torch

from pp_media._hf.router_loss import RouterLoss, recording_router_logits
from pp_media.testing import _moe_survey as moe
from pp_media.testing._moe import EXPERTS, ROUTER_AUX_LOSS_COEF, TOP_K

AUX = moe.AUX_LOSS_FAMILIES
#: Families whose whole forward runs (Llama4's ``ForConditionalGeneration.forward`` fails).
FORWARD = tuple(t for t in moe.MODEL_TYPES if t != "llama4")


@functools.cache
def _model(model_type: str) -> Any:
    return moe.tiny_model(model_type)


def _forward(model_type: str, batch: dict[str, Any], **kwargs: Any) -> tuple[Any, list]:
    """The model's output with router logits, and the logits our hook recorded."""
    model = _model(model_type)
    modules, index = moe.routers(model, model_type)
    with recording_router_logits(modules, index) as recorded:
        out = model(**batch, output_router_logits=True, **kwargs)
    return out, recorded


@functools.cache
def _run(model_type: str) -> tuple[dict[str, Any], Any, list]:
    """The padded survey batch's forward (cached: one forward per family for most tests)."""
    model = _model(model_type)
    batch = moe.tiny_batch(model.config)
    out, recorded = _forward(model_type, batch)
    return batch, out, recorded


def _groups(logits: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """Consecutive layer groups, as a pipeline's stages hold them."""
    return [list(part) for part in _split(logits, n)]


def _split(items: list, n: int) -> list[list]:
    bounds = torch.tensor_split(torch.arange(len(items)), n)
    return [[items[i] for i in part.tolist()] for part in bounds]


def _spec(model_type: str) -> RouterLoss:
    """The family's loss; for families without one in transformers, E and top-k only."""
    if model_type not in AUX:
        return RouterLoss(EXPERTS, TOP_K, coef=0.0)
    return RouterLoss.from_text_config(_model(model_type).config.get_text_config())


def _transformers_loss(model_type: str) -> Any:
    """The family's ``load_balancing_loss_func`` (its model's module's); for the others the
    (identical) Qwen3-VL-MoE copy, applied to what they record (Gemma4 records probabilities:
    the formula still holds, though transformers never applies it there)."""
    owner = _model(model_type if model_type in AUX else "qwen3_vl_moe")
    return sys.modules[type(owner).__module__].load_balancing_loss_func


@pytest.mark.parametrize("model_type", FORWARD)
def test_hooks_record_what_transformers_records(model_type: str) -> None:
    _, out, recorded = _run(model_type)
    assert out.router_logits is not None and len(recorded) == len(out.router_logits) > 0
    for mine, theirs in zip(recorded, out.router_logits, strict=True):
        assert mine is theirs or torch.equal(mine, theirs)


@pytest.mark.parametrize("model_type", AUX)
def test_config_names_read_per_family(model_type: str) -> None:
    # Qwen3-VL-MoE's fixture keeps 0.01: the README's measured router-loss gaps are its.
    coef = 0.01 if model_type == "qwen3_vl_moe" else ROUTER_AUX_LOSS_COEF
    assert _spec(model_type) == RouterLoss(EXPERTS, TOP_K, coef)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("mask", ["padded", "ones", "none"])
@pytest.mark.parametrize("model_type", FORWARD)
def test_stage_sums_equal_transformers(model_type: str, mask: str, stages: int) -> None:
    """``ones``: a mask without padding; ``none``: no mask (the model itself always passes its
    mask, so only ``padded`` is compared with the model's ``aux_loss``)."""
    batch, out, recorded = _run(model_type)
    attention_mask = {
        "padded": batch["attention_mask"],
        "ones": torch.ones_like(batch["attention_mask"]),
        "none": None,
    }[mask]
    spec = _spec(model_type)
    theirs = _transformers_loss(model_type)(
        tuple(recorded), spec.num_experts, spec.top_k, attention_mask
    )
    stats = spec.zeros()
    for group in _groups(recorded, stages):
        stats = spec.accumulate(stats, group, attention_mask)
    mine = spec.aux_loss(stats)
    assert torch.equal(mine, theirs), (mine.item(), theirs.item())
    if mask == "padded" and model_type in AUX:
        assert torch.equal(mine, out.aux_loss)
    counted = batch["input_ids"].numel() if attention_mask is None else attention_mask.sum()
    assert stats[-1].item() == int(counted) * len(recorded)
    assert stats[: spec.num_experts].sum().item() == stats[-1].item() * spec.top_k

    grads_mine = torch.autograd.grad(mine, recorded, retain_graph=True)
    grads_theirs = torch.autograd.grad(theirs, recorded, retain_graph=True)
    for g_mine, g_theirs in zip(grads_mine, grads_theirs, strict=True):
        assert torch.equal(g_mine, g_theirs)
        if mask == "padded":
            padding = attention_mask.reshape(-1) == 0
            assert padding.any() and not g_mine[padding].any()


#: Families that route with a correction bias, and the router class whose output index 2
#: holds the experts each token actually goes to.
BIASED = {
    "glm4v_moe": "Glm4vMoeTextTopkRouter",
    "minimax_m3_vl": "MiniMaxM3VLTopKRouter",
    "ernie4_5_vl_moe": "Ernie4_5_VLMoeMoeTopKRouter",
}


@pytest.mark.parametrize("model_type", sorted(BIASED))
def test_biased_routing_is_not_what_the_loss_counts(model_type: str) -> None:
    """The quirk kept on purpose: these families route on ``score + bias`` but transformers'
    loss (and ours, equal to it above) counts the top-k of ``softmax(raw logits)``."""
    model = _model(model_type)
    batch = moe.tiny_batch(model.config)
    modules = [m for m in model.modules() if type(m).__name__ == BIASED[model_type]]
    with recording_router_logits(modules, 2) as chosen, recording_router_logits(modules, 0) as raw:
        model(**batch, output_router_logits=True)
    k = TOP_K
    differing = 0
    for logits, indices in zip(raw, chosen, strict=True):
        counted = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices.sort(-1).values
        differing += int((counted != indices.sort(-1).values).any(-1).sum())
    assert differing > 0


@pytest.mark.parametrize("model_type", AUX)
def test_stages_summed_at_the_end_differ_only_by_rounding(model_type: str) -> None:
    """The alternative (each stage from zeros, the last stage adds them up) changes only the
    order of the probability additions."""
    batch, _, recorded = _run(model_type)
    spec = _spec(model_type)
    mask = batch["attention_mask"]
    chained = spec.accumulate(spec.zeros(), recorded, mask)
    separate = sum(spec.accumulate(spec.zeros(), g, mask) for g in _groups(recorded, 3))
    assert torch.equal(chained[: spec.num_experts], separate[: spec.num_experts])
    assert torch.equal(chained[-1], separate[-1])
    torch.testing.assert_close(spec.aux_loss(separate), spec.aux_loss(chained), rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_type", AUX)
def test_model_loss_is_cross_entropy_plus_coef_aux(model_type: str) -> None:
    batch, out, recorded = _run(model_type)
    spec = _spec(model_type)
    plain = _model(model_type)(**batch, output_router_logits=False)
    stats = spec.accumulate(spec.zeros(), recorded, batch["attention_mask"])
    assert plain.loss.item() != out.loss.item()
    assert torch.equal(plain.loss + spec.loss_term(stats), out.loss)


@pytest.mark.parametrize("model_type", AUX)
def test_per_microbatch_form_is_transformers_per_microbatch(model_type: str) -> None:
    """Each microbatch's aux equals the model's own on that microbatch; their mean differs
    from the whole batch's aux (``benchmarks/moe_survey.py`` prints by how much)."""
    batch, out, _ = _run(model_type)
    spec = _spec(model_type)
    chunks = moe.microbatches(_model(model_type).config, batch, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2]
    terms = []
    for chunk in chunks:
        mb_out, recorded = _forward(model_type, chunk)
        stats = spec.zeros()
        for group in _groups(recorded, 2):
            stats = spec.accumulate(stats, group, chunk["attention_mask"])
        assert torch.equal(spec.aux_loss(stats), mb_out.aux_loss)
        terms.append(spec.loss_term(stats, n_microbatches=len(chunks)))
    pipelined = torch.stack(terms).sum()
    whole = spec.coef * out.aux_loss
    assert (pipelined - whole).abs().item() > 0


def test_errors_name_the_shape_and_the_fix() -> None:
    spec = RouterLoss(num_experts=4, top_k=2, coef=0.01)
    with pytest.raises(ValueError, match=r"^pp_media: router_logits has shape \[6, 3\]"):
        spec.layer_stats(torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"attention_mask has 8 entries but .* 6 rows"):
        spec.layer_stats(torch.zeros(6, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"router stats have shape \[8\]; expected \[9\]"):
        spec.aux_loss(torch.ones(8))

    class NoCoef:
        num_experts, num_experts_per_tok = 4, 2

    with pytest.raises(ValueError, match="has no router_aux_loss_coef"):
        RouterLoss.from_text_config(NoCoef())


def test_counts_and_rows_carry_no_gradient() -> None:
    """Only the probability sums reach the logits: d aux / d probs[e] = E * counts[e] / rows^2."""
    spec = RouterLoss(num_experts=4, top_k=2, coef=1.0)
    logits = torch.randn(10, 4, requires_grad=True, generator=torch.Generator().manual_seed(0))
    stats = spec.layer_stats(logits)
    stats.retain_grad()
    spec.aux_loss(stats).backward()
    counts, rows = stats[:4].detach(), stats[-1].detach()
    torch.testing.assert_close(stats.grad[4:8], 4 * counts / rows**2)
    assert counts.sum().item() == 20 and rows.item() == 10
