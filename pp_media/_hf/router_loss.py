"""The mixture-of-experts router load-balancing loss, accumulated stage by stage.

transformers' ``load_balancing_loss_func`` (identical in qwen3_vl_moe, qwen3_5_moe, glm4v_moe,
ernie4_5_vl_moe, minimax_m3_vl and the qwen3_omni_moe thinker) takes every MoE layer's raw
router logits ``[rows, E]`` (``rows = batch * seq``) and, layer after layer, adds up

* ``counts[e]``: how many top-k slots chose expert ``e`` (top-k of ``softmax(logits)``),
* ``probs[e]``:  the sum over rows of ``softmax(logits)[:, e]``,
* ``rows``:      the rows counted,

each weighted by the flattened 2-D attention mask when one is given (padding rows count zero).
At the end ``aux = E * sum_e (counts[e] / rows) * (probs[e] / rows)`` and the model's loss
gains ``router_aux_loss_coef * aux``.

Design: why this can be pipelined. The counts come from ``topk``, an index selection, so they
carry no gradient; ``rows`` is a count too. The loss is therefore linear in the probability
sums for fixed counts, and its gradient reaches each layer's logits only through that layer's
own ``probs`` term: ``d aux / d probs[e] = E * counts[e] / rows**2``. So nothing about a layer
has to stay alive beyond its own stage: each stage turns its layers' logits into one dense
``[2E + 1]`` tensor ``[counts | probs | rows]`` (``LayerStats``), adds it to the tensor it
received from the previous stage and sends the sum on beside the hidden states. The last stage
applies the formula (``aux_loss``); backward sends the gradient of that small tensor upstream,
where its ``probs`` part flows into each stage's router logits and the rest stops (the counts
and rows were detached). Because every stage adds its layers in model order onto the running
tensor, the additions happen in exactly the order transformers makes them, so one microbatch
gives transformers' value bit for bit.

What a pipeline cannot give is the *whole-batch* value: that needs every microbatch's counts
before any backward. Per microbatch the formula sees only that microbatch's rows; the pipeline
loss adds ``coef * aux(microbatch) / n_microbatches`` per microbatch (``aux_loss``'s
``n_microbatches``) so that the step's sum keeps the unsplit model's scale; with one
microbatch the aux term is transformers' bit for bit and the loss ``model(**batch).loss`` up
to the token cross-entropy's summation order (one ulp measured).

Family quirks this keeps: glm4v_moe, minimax_m3_vl and inkling route with ``sigmoid(logits) +
e_score_correction_bias`` (glm4v_moe also group-limited), and ernie4_5_vl_moe adds its
``moe_statics`` bias before the top-k, but transformers' loss re-softmaxes the raw logits and
takes its own top-k of them; so do we (``LayerStats`` takes raw logits and nothing else).
Torch only: no transformers import.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Config attribute names, in the order tried, of the routed-expert count and top-k.
_EXPERT_NAMES = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOP_K_NAMES = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts")


@dataclass(frozen=True)
class RouterLoss:
    """One family's load-balancing loss: experts ``E``, top-k and ``router_aux_loss_coef``."""

    num_experts: int
    top_k: int
    coef: float

    @classmethod
    def from_text_config(cls, config: Any) -> RouterLoss:
        """Read ``E``, top-k and the coefficient from a text config, whatever the family calls
        them (``num_experts`` / ``n_routed_experts`` / ``num_local_experts`` /
        ``moe_num_experts``; ``num_experts_per_tok`` / ``moe_k`` / ...)."""
        experts = _first(config, _EXPERT_NAMES, "number of routed experts")
        top_k = _first(config, _TOP_K_NAMES, "router top-k")
        coef = getattr(config, "router_aux_loss_coef", None)
        if coef is None:
            raise ValueError(
                f"pp_media: the text config {type(config).__name__} has no "
                "router_aux_loss_coef; expected an MoE config whose model adds a router "
                "load-balancing loss. Pass RouterLoss(num_experts, top_k, coef) directly."
            )
        return cls(int(experts), int(top_k), float(coef))

    @property
    def size(self) -> int:
        """Length of the stats tensor: ``2E + 1``."""
        return 2 * self.num_experts + 1

    def zeros(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The stats tensor before the first MoE layer (stage 0 starts from it)."""
        return torch.zeros(self.size, dtype=torch.float32, device=device)

    def layer_stats(
        self, router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[counts | probs | rows]`` of one layer's raw router logits ``[rows, E]``.

        ``attention_mask`` is the microbatch's 2-D ``[batch, seq]`` mask (1 = token); its
        flattened length must equal the logits' rows, as transformers assumes.
        """
        experts = self.num_experts
        if router_logits.dim() != 2 or router_logits.shape[-1] != experts:
            raise ValueError(
                f"pp_media: router_logits has shape {list(router_logits.shape)}; expected "
                f"[rows, {experts}] (one row per token, one column per routed expert)."
            )
        # Softmax in the logits' dtype, sums in fp32: as transformers does, so bf16 matches too.
        probs = torch.softmax(router_logits, dim=-1)
        selected = torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1)
        probs = probs.float()
        if attention_mask is None:
            counts = torch.bincount(selected, minlength=experts).to(torch.float32)
            prob_sums = probs.sum(dim=0)
            rows = torch.full((1,), float(probs.shape[0]), device=probs.device)
        else:
            flat = attention_mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
            if flat.shape[0] != probs.shape[0]:
                raise ValueError(
                    f"pp_media: attention_mask has {flat.shape[0]} entries but the router "
                    f"logits have {probs.shape[0]} rows; pass this microbatch's [batch, seq] "
                    "attention mask (batch * seq must equal the rows)."
                )
            counts = torch.zeros(experts, dtype=torch.float32, device=probs.device)
            counts = counts.scatter_add(0, selected, flat.repeat_interleave(self.top_k))
            prob_sums = (probs * flat.unsqueeze(-1)).sum(dim=0)
            rows = flat.sum().reshape(1)
        return torch.cat([counts.detach(), prob_sums, rows.detach()])

    def accumulate(
        self,
        stats: torch.Tensor,
        router_logits: Iterable[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``stats`` plus this stage's layers, added one layer at a time in model order (the
        order transformers adds them, so the sums match it bit for bit)."""
        for logits in router_logits:
            stats = stats + self.layer_stats(logits, attention_mask).to(stats.device)
        return stats

    def aux_loss(self, stats: torch.Tensor) -> torch.Tensor:
        """transformers' ``aux`` (without the coefficient) from summed stats, exactly as
        ``load_balancing_loss_func`` finishes it."""
        experts = self.num_experts
        if stats.shape != (self.size,):
            raise ValueError(
                f"pp_media: router stats have shape {list(stats.shape)}; expected "
                f"[{self.size}] = [counts ({experts}) | probability sums ({experts}) | rows]."
            )
        rows = stats[2 * experts]
        tokens_per_expert = stats[:experts] / rows
        prob_per_expert = stats[experts : 2 * experts] / rows
        return torch.sum(tokens_per_expert * prob_per_expert.unsqueeze(0)) * experts

    def loss_term(self, stats: torch.Tensor, n_microbatches: int = 1) -> torch.Tensor:
        """What the last stage adds to a microbatch's loss: ``coef * aux / n_microbatches``,
        so that the step's sum over microbatches keeps the unsplit model's scale."""
        return self.coef * self.aux_loss(stats) / n_microbatches


def _first(config: Any, names: Sequence[str], what: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(
        f"pp_media: the text config {type(config).__name__} has none of {list(names)} "
        f"(the {what}); pass RouterLoss(num_experts, top_k, coef) directly."
    )


@contextmanager
def recording_router_logits(
    modules: Sequence[nn.Module], index: int
) -> Iterator[list[torch.Tensor]]:
    """Collect ``output[index]`` of each of ``modules`` (a stage's routers, in layer order)
    while the block runs: what transformers' ``OutputRecorder`` records as ``router_logits``
    (index 0 of the router for most families, 1 of ``Llama4Router`` and of ernie4_5_vl_moe's
    ``MoeBlock``). The list holds one tensor per router call, in call order."""
    recorded: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        recorded.append(output[index])

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
