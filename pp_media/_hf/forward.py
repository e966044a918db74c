"""The pipelined model's logits for a whole batch, forward only: what an exported model must match.

torch's schedules run forward only when their ``_has_backward`` is off (what ``schedule.eval``
does); this runs the same path as ``VLMPipeline.step`` (prepared inputs, media routed to stage
0) that way, under ``torch.no_grad`` with the stages in eval mode, and returns the last stage's
outputs merged over the microbatches, without the pad rows that make microbatches even.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds
from pp_media._core.device import move_vlm_media_to_device
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._pipeline.step import step_with_media


@torch.no_grad()
def forward_logits(pipe: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Logits ``[B, T, vocab]`` of ``batch`` on the rank of the last stage, None elsewhere; the
    parameters, their gradients and the stages' train/eval modes are left as they were."""
    inputs = pipe.prepare(batch)
    pipe.loss_fn.label_tokens = inputs.label_tokens
    kwargs = {name: value.to(pipe.device) for name, value in inputs.kwargs.items()}
    media = move_vlm_media_to_device({VLM_PP_MEDIA_KEY: inputs.media}, pipe.device)
    schedule = pipe.schedule
    modes = [stage.training for stage in pipe.stages]
    had_backward = schedule._has_backward
    schedule._has_backward = False
    try:
        for stage in pipe.stages:
            stage.eval()
        outputs = step_with_media(
            schedule,
            inputs.input_ids.to(pipe.device),
            media=media[VLM_PP_MEDIA_KEY],
            target=inputs.labels.to(pipe.device) if pipe.has_last_stage else None,
            losses=[] if pipe.has_last_stage else None,
            return_outputs=True,
            **kwargs,
        )
    finally:
        schedule._has_backward = had_backward
        for stage, mode in zip(pipe.stages, modes, strict=True):
            stage.train(mode)
    if not pipe.has_last_stage:
        return None
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    return logits[_sample_rows(batch["input_ids"].shape[0], pipe.n_microbatches)]


def _sample_rows(batch_size: int, n_microbatches: int) -> torch.Tensor:
    """Rows of the evenly padded batch (``ceil(B / M)`` rows per microbatch, samples first)
    that hold the batch's samples, in order."""
    bounds = sample_bounds(batch_size, n_microbatches)
    per_microbatch = -(-batch_size // n_microbatches)
    return torch.cat(
        [
            torch.arange(bounds[k + 1] - bounds[k]) + k * per_microbatch
            for k in range(n_microbatches)
        ]
    )
