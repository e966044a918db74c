"""Forward-only pipeline steps: the loss of a batch without a backward pass.

torch's schedules run forward-only through ``schedule.eval``: it clears the schedule's
``_has_backward`` for one ``step``; every backward action then returns at once
(``backward_one_chunk``, ``backward_weight_one_chunk``, no gradient sends or receives), and the
stages re-run their forward set-up on each switch between training and evaluation. In torch
2.13 that works for GPipe, 1F1B, Interleaved1F1B, LoopedBFS and InterleavedZeroBubble. The
V-shaped schedules (ZBVZeroBubble, DualPipeV) place two adjacent stages on one rank and hand
the gradient between them locally after each backward action, and
``PipelineStage.get_local_bwd_output`` asserts a backward: ``schedule.eval`` fails there, so
evaluation refuses them up front. The stages run in eval mode under ``torch.no_grad()``, so no
graph is built and no gradient is touched; each module's train/eval mode is put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pp_media._hf.partition import StageLayout


def check_forward_only(layout: StageLayout) -> None:
    """Refuse, on every rank alike and before any communication, a schedule that torch
    cannot run forward-only."""
    if layout.v_shaped:
        name = layout.schedule_class.__name__.removeprefix("Schedule")
        raise ValueError(
            f"pp_media: eval_step cannot run the V-shaped schedule {name}: torch 2.13's "
            "forward-only schedule.eval fails there (its two adjacent stages on one rank hand "
            "gradients over locally, and PipelineStage.get_local_bwd_output asserts a backward). "
            "Evaluate with a pipeline built with GPipe, 1F1B, Interleaved1F1B, LoopedBFS or "
            "InterleavedZeroBubble."
        )


@contextmanager
def forward_only(modules: Sequence[nn.Module]) -> Iterator[None]:
    """``torch.no_grad()`` with every module in eval mode (dropout off); each submodule's
    ``training`` flag is restored on the way out, also on error."""
    modes = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for root in modules:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
