"""Balanced vs natural order on real gloo ranks: the same step, the same loss and gradients.

Each rank of a 2-rank gloo group runs, per case, one pipeline step of the toy VLM of
``distributed_worker.py`` on a batch in its collated order and one on the same batch balanced by
``wrap_vlm_collate_for_pp(..., balance_media=True)``, each from fresh copies of one model, and
records the loss, every gradient and what each stage-0 forward received. ``test_balance.py``
spawns it once and compares.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import distributed_worker as dw
import torch
from torch.distributed.pipelining import PipelineStage

import pp_media
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 2

#: (schedule, images per sample, microbatches): image-heavy samples clustered at the front, so
#: balancing moves them; 6 / 4 also exercises the pad rows of uneven microbatches.
CASES: dict[str, tuple[str, dw.BatchSpec]] = {
    "1F1B/B8_M4": ("1F1B", dw.BatchSpec((3, 3, 2, 2, 0, 1, 0, 0), 4)),
    "1F1B/B6_M4": ("1F1B", dw.BatchSpec((3, 2, 2, 0, 0, 0), 4)),
    "Interleaved1F1B/B8_M4": ("Interleaved1F1B", dw.BatchSpec((0, 3, 3, 2, 1, 0, 0, 2), 4)),
}


class _Collate:
    """A collate function that returns a fresh copy of one prebuilt batch."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, examples: Any) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.batch.items()}


def run_step(rank: int, schedule_name: str, spec: dw.BatchSpec, balance: bool) -> dict[str, Any]:
    """One pipeline step; loss (last stage), gradients by reference name, stage-0 log."""
    torch.manual_seed(0)
    model = dw.TinyVLM()
    n_microbatches = spec.n_microbatches
    ref_loss, ref_grads = dw.reference(model, dw.make_batch(spec, seed=1))
    collate = pp_media.wrap_vlm_collate_for_pp(
        _Collate(dw.make_batch(spec, seed=1)),
        n_microbatches,
        even_microbatches=True,
        balance_media=balance,
    )
    batch = collate([])
    order = batch.pop(pp_media.VLM_PP_SAMPLE_ORDER_KEY, None)
    media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)

    single = schedule_name in dw.SINGLE_STAGE
    n_stages = WORLD_SIZE if single else 2 * WORLD_SIZE
    stage_ids = [rank] if single else [rank, rank + WORLD_SIZE]
    log: list[Any] = []
    modules = [dw.build_stage_module(model, i, n_stages, "kwargs", log) for i in stage_ids]
    stages = [
        PipelineStage(module, i, n_stages, torch.device("cpu"))
        for module, i in zip(modules, stage_ids, strict=True)
    ]
    total = int((batch["labels"] != -100).sum())
    schedule = dw.SCHEDULES[schedule_name](
        stages[0] if single else stages,
        n_microbatches=n_microbatches,
        loss_fn=dw.make_loss(total),
        scale_grads=False,
    )
    holds_first, holds_last = 0 in stage_ids, n_stages - 1 in stage_ids
    args = (batch["input_ids"],) if holds_first else ()
    target = batch["labels"] if holds_last else None
    losses: list[torch.Tensor] = []
    pp_media.step_with_media(schedule, *args, media=media, target=target, losses=losses)

    mappings = dw._stage_param_names(n_stages)
    grads, ref = {}, {}
    for module, index in zip(modules, stage_ids, strict=True):
        for name, param in module.named_parameters():
            grads[mappings[index][name]] = param.grad.flatten().tolist()
            ref[mappings[index][name]] = ref_grads[mappings[index][name]].flatten().tolist()
    result: dict[str, Any] = {"grads": grads, "ref_grads": ref, "log": log, "ref_loss": ref_loss}
    if order is not None:
        result["order"] = order.tolist()
    if holds_last:
        result["loss"] = float(sum(loss.item() for loss in losses))
    return result


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing.spawn``): every run, in order."""
    runs = [
        (f"{key}/{'balanced' if balance else 'natural'}", partial(run_step, rank, *case, balance))
        for key, case in CASES.items()
        for balance in (False, True)
    ]
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
