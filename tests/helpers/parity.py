"""Comparing a pipelined step with the unsplit reference model, for the Hugging Face parity tests.

Rank side (the workers): ``max_abs_diff`` (gradients or parameter values, by the unsplit
model's parameter names), ``missing_grads``, ``largest`` and ``placeholder_runs``. Test side:
``last_stage_result`` and ``loss_errors`` over the per-rank results, whose ``steps`` records
carry ``loss`` (on the last stage's rank only) and ``ref_loss``, with ``largest_differences``
for the measured maxima.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

#: The single-process reference of a router-loss case (aux on, more than one microbatch):
#: transformers' ``load_balancing_loss_func`` applied per microbatch on the unsplit model.
from pp_media.testing import per_microbatch_router_loss  # noqa: F401

#: The tied parameters of the transformers VLMs: the input embedding and the LM head.
EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"
#: Batch fields that would give the items per sample (or an item's rows); the pipeline must
#: derive them instead.
COUNT_FIELDS = ("n_images_per_sample", "n_videos_per_sample", "n_tiles_per_image")


def max_abs_diff(
    named: Mapping[str, torch.nn.Parameter],
    reference: Mapping[str, torch.Tensor | None],
    *,
    grads: bool,
) -> tuple[float, str, float]:
    """Largest |pipeline - reference| over ``named`` (their gradients with ``grads``, else their
    values), the worst parameter's name and the largest reference magnitude. A None gradient
    counts as zeros; a parameter with no gradient on either side is skipped."""
    worst, worst_name, scale = 0.0, "", 0.0
    for name, param in named.items():
        ref = reference[name]
        mine = param.grad if grads else param.detach()
        if ref is None and mine is None:
            continue
        ref = torch.zeros_like(param) if ref is None else ref
        mine = torch.zeros_like(param) if mine is None else mine
        diff = (mine - ref).abs().max().item()
        scale = max(scale, ref.abs().max().item())
        if diff >= worst:
            worst, worst_name = diff, name
    return worst, worst_name, scale


def missing_grads(
    named: Mapping[str, torch.nn.Parameter], ref_grads: Mapping[str, torch.Tensor | None]
) -> list[str]:
    """The parameters in ``named`` without a gradient where the reference has a non-zero one."""
    return sorted(
        name
        for name, param in named.items()
        if param.grad is None and ref_grads[name] is not None and bool(ref_grads[name].any())
    )


def largest(tensors: Iterable[torch.Tensor | None]) -> float:
    """Largest magnitude over ``tensors`` (None entries skipped); 0.0 for none."""
    return max((t.abs().max().item() for t in tensors if t is not None), default=0.0)


def placeholder_runs(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Runs of ``token_id`` per sample: its items (or Qwen3-VL video frames), as the synthetic
    rows separate consecutive items by text or by start/end tokens."""
    is_token = input_ids == token_id
    starts = is_token & ~torch.nn.functional.pad(is_token, (1, 0))[:, :-1]
    return starts.sum(1).tolist()


def last_stage_result(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The result of the one rank holding the last stage; asserts that ``step()`` returned the
    loss exactly on that rank, in every step."""
    holders = [result for result in per_rank if result["has_last_stage"]]
    assert len(holders) == 1, "exactly one rank holds the last stage"
    for rank, result in enumerate(per_rank):
        returned = ["loss" in step for step in result["steps"]]
        assert all(returned) if result["has_last_stage"] else not any(returned), (
            f"rank {rank}: step() returns the loss exactly on the last stage's rank"
        )
    return holders[0]


def loss_errors(per_rank: list[dict[str, Any]]) -> list[float]:
    """Per step, |pipeline loss - reference loss| from the one rank that returned a loss."""
    return [abs(step["loss"] - step["ref_loss"]) for step in last_stage_result(per_rank)["steps"]]


def largest_differences(per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """A case's largest ``loss``, ``grad`` and ``param`` differences from the reference, over
    its steps and ranks (``param`` 0.0 without optimizer steps)."""
    steps = [step for result in per_rank for step in result["steps"]]
    return {
        "loss": max(loss_errors(per_rank)),
        "grad": max(step["grad_err"] for step in steps),
        "param": max((step.get("param_err", 0.0) for step in steps), default=0.0),
    }


def quiet_transformers() -> None:
    """Only transformers' errors, no progress bars (a spawned rank's output stays readable)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def snapshot(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``batch``, to tell afterwards whether a step modified it."""
    return {name: value.clone() for name, value in batch.items()}


def unchanged(batch: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``batch`` still has exactly the fields and values of its ``snapshot``."""
    return sorted(batch) == sorted(before) and all(
        torch.equal(batch[name], value) for name, value in before.items()
    )


def compare_step(
    named: Mapping[str, torch.nn.Parameter],
    ref_grads: Mapping[str, torch.Tensor | None],
    loss: torch.Tensor | None,
    ref_loss: torch.Tensor,
) -> dict[str, Any]:
    """One step's record on this rank: the largest gradient difference from the reference
    (``grad_err``, at ``grad_worst``; ``grad_scale`` the largest reference gradient), the
    ``missing_grads``, and ``loss`` / ``ref_loss`` where ``step()`` returned a loss here."""
    grad_err, grad_worst, grad_scale = max_abs_diff(named, ref_grads, grads=True)
    record: dict[str, Any] = {
        "grad_err": grad_err,
        "grad_worst": grad_worst,
        "grad_scale": grad_scale,
        "missing_grads": missing_grads(named, ref_grads),
    }
    if loss is not None:
        record.update(loss=loss.item(), ref_loss=ref_loss.item())
    return record


def step_both_and_compare(
    ref_optimizer: torch.optim.Optimizer,
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, torch.nn.Parameter],
    reference_params: Mapping[str, torch.nn.Parameter],
) -> dict[str, Any]:
    """One optimizer step of the reference and of the pipeline, then the largest parameter
    difference (``param_err``, at ``param_worst``); both sides' gradients are zeroed after."""
    ref_optimizer.step()
    optimizer.step()
    ref_values = {name: param.detach() for name, param in reference_params.items()}
    param_err, param_worst, _ = max_abs_diff(named, ref_values, grads=False)
    ref_optimizer.zero_grad()
    optimizer.zero_grad()
    return {"param_err": param_err, "param_worst": param_worst}
