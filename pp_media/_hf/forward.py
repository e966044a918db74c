"""The pipelined model's logits for a whole batch, forward only: what an exported model must match.

The same forward-only path as ``VLMPipeline.eval_step`` (prepared inputs agreed over the mesh,
media routed to stage 0, torch's ``schedule.eval`` under ``evaluation.forward_only``), asking
the schedule for the last stage's outputs, merged over the microbatches, without the pad rows
that make microbatches even.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds
from pp_media._core.device import move_vlm_media_to_device
from pp_media._hf.evaluation import check_forward_only, forward_only
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._pipeline.step import step_with_media


def forward_logits(pipe: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Logits ``[B, T, vocab]`` of ``batch`` on the rank of the last stage, None elsewhere; the
    parameters, their gradients and the stages' train/eval modes are left as they were. Same
    schedules as ``eval_step`` (not the V-shaped ones)."""
    check_forward_only(pipe.layout)
    inputs = pipe._prepare_replicas(batch)
    pipe.loss_fn.label_tokens = inputs.label_tokens
    kwargs = {name: value.to(pipe.device) for name, value in inputs.kwargs.items()}
    media = move_vlm_media_to_device({VLM_PP_MEDIA_KEY: inputs.media}, pipe.device)
    with forward_only(pipe.stages):
        outputs = step_with_media(
            pipe.schedule,
            inputs.input_ids.to(pipe.device),
            media=media[VLM_PP_MEDIA_KEY],
            target=inputs.labels.to(pipe.device) if pipe.has_last_stage else None,
            losses=[] if pipe.has_last_stage else None,
            return_outputs=True,
            forward_only=True,
            layout=pipe.adapter.media_layout,
            **kwargs,
        )
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
