"""Rank side of ``test_router_stats_pipeline.py``: a toy MoE stack whose router stats tensor
(``RouterLoss``, ``[2E + 1]``) travels beside the hidden states through torch's own schedules.

Each toy layer has a router (``Linear(H, E)``) whose top-k softmax weight scales the hidden
states, so the routers get gradients from both the task loss and the aux loss. Stages return
``(hidden, stats)``; the last stage's loss adds ``RouterLoss.loss_term(stats, M)``. The
reference applies the same loss per microbatch on the unsplit stack in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

from pp_media._hf.router_loss import RouterLoss
from tests.helpers.ranks import Result, run_cases_on_rank

EXPERTS, TOP_K, HIDDEN, BATCH, SEQ, MICRO = 4, 2, 8, 4, 5, 2
SPEC = RouterLoss(EXPERTS, TOP_K, coef=0.1)
WORLD = 2
#: (schedule, stages, whether the layers of stage 0 have routers)
CASES = [
    ("GPipe", 2, True),
    ("1F1B", 2, True),
    ("1F1B", 2, False),
    ("Interleaved1F1B", 4, True),
]


class ToyLayer(nn.Module):
    def __init__(self, routed: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(HIDDEN, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS) if routed else None

    def forward(self, hidden: torch.Tensor, recorded: list[torch.Tensor]) -> torch.Tensor:
        if self.router is not None:
            logits = self.router(hidden).reshape(-1, EXPERTS)
            recorded.append(logits)
            top = torch.softmax(logits, -1).topk(TOP_K, -1).values.sum(-1)
            hidden = hidden * top.reshape(*hidden.shape[:-1], 1)
        return hidden + torch.tanh(self.lin(hidden))


class ToyStage(nn.Module):
    """Layers of one stage; stage 0 starts the stats, the others add to what they receive."""

    def __init__(self, layers: list[ToyLayer], first: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.first = first

    def forward(
        self,
        hidden: torch.Tensor,
        stats: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            stats = SPEC.zeros(hidden.device)
        recorded: list[torch.Tensor] = []
        for layer in self.layers:
            hidden = layer(hidden, recorded)
        # A stage without routers must not hand back the very tensor it received.
        stats = SPEC.accumulate(stats, recorded, attention_mask) if recorded else stats.clone()
        return hidden, stats


def toy_layers(routed_first: bool) -> list[ToyLayer]:
    torch.manual_seed(0)
    return [ToyLayer(routed_first), ToyLayer(routed_first), ToyLayer(True), ToyLayer(True)]


def loss_fn(output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    hidden, stats = output
    task = ((hidden - target) ** 2).sum() / (BATCH * SEQ)
    return task + SPEC.loss_term(stats, MICRO)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    target = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    mask = torch.ones(BATCH, SEQ)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    return inputs, target, mask


def reference(routed_first: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The per-microbatch formula on the unsplit stack: loss and every gradient."""
    layers = toy_layers(routed_first)
    whole = ToyStage(layers, first=True)
    inputs, target, mask = batch()
    total = torch.zeros(())
    for x, y, m in zip(
        inputs.tensor_split(MICRO),
        target.tensor_split(MICRO),
        mask.tensor_split(MICRO),
        strict=True,
    ):
        total = total + loss_fn(whole(x, attention_mask=m), y)
    total.backward()
    return total.item(), {n: p.grad for n, p in whole.named_parameters()}


def run_case(rank: int, schedule: str, n_stages: int, routed_first: bool) -> Result:
    layers = toy_layers(routed_first)
    per_stage = len(layers) // n_stages
    stage_ids = list(range(rank, n_stages, WORLD))
    stages, modules = [], {}
    for index in stage_ids:
        module = ToyStage(layers[index * per_stage : (index + 1) * per_stage], first=index == 0)
        modules[index] = module
        stages.append(PipelineStage(module, index, n_stages, torch.device("cpu")))
    cls = get_schedule_class(schedule)
    target_stage = stages if len(stages) > 1 else stages[0]
    runner = cls(target_stage, MICRO, loss_fn=loss_fn, scale_grads=False)
    inputs, target, mask = batch()
    losses: list[torch.Tensor] = []
    if rank == 0:
        runner.step(inputs, attention_mask=mask, target=target, losses=losses)
    else:
        runner.step(attention_mask=mask, target=target, losses=losses)
    ref_loss, ref_grads = reference(routed_first)
    worst = 0.0
    for index, module in modules.items():
        for name, param in module.named_parameters():
            layer, rest = name.split(".", 2)[1:]
            ref = ref_grads[f"layers.{index * per_stage + int(layer)}.{rest}"]
            worst = max(worst, (param.grad - ref).abs().max().item())
    loss = sum(item.item() for item in losses) if losses else None
    return {"loss": loss, "ref_loss": ref_loss, "grad_diff": worst}


def cases(rank: int) -> list[tuple[str, Any]]:
    return [(f"{s}/{n}/{r}", lambda s=s, n=n, r=r: run_case(rank, s, n, r)) for s, n, r in CASES]


def worker(rank: int, port: int, out_dir: str) -> None:
    run_cases_on_rank(rank, port, out_dir, cases(rank), world_size=WORLD)
