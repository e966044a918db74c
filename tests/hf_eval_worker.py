"""``VLMPipeline.eval_step`` and the training-loop API around it, on 2 real gloo ranks.

Each case builds a tiny Qwen2-VL on both ranks with an unsplit deep copy as the reference and
runs, in this order (each pipeline call beside the reference's own):

1. ``eval_step(A)`` first, before any training step (torch's shape inference then runs
   forward-only): the loss against ``model.eval()`` under ``no_grad`` on
   ``pipe.reference_batch(A)``; no gradient may exist afterwards.
2. ``step(B)``: loss and every gradient against one reference backward.
3. ``eval_step(A)`` again: the loss as in 1, every gradient bit for bit as after 2, every module
   back in train mode.
4. ``step(B)`` again (torch re-initialises for training after eval): the gradients now equal two
   accumulated reference backwards. With tied embeddings split over the two ranks this also
   checks gradient accumulation across steps: the copies' all-reduce used to sum the already
   shared gradient again (3x instead of 2x the tied gradient after two steps).

The pipeline's batches carry no ``mm_token_type_ids`` (the step derives them); the reference
gets them from ``pipe.reference_batch``. Each rank also records ``last_stage_rank``,
``broadcast_loss`` and what ``named_parameters`` yields. The ``dropout`` case (attention dropout
0.5) compares only evaluations: a pipeline left in train mode would drop attention weights at
random and miss the reference. The ``bfloat16`` case builds with ``dtype="bfloat16"``. On the
V schedules, which torch 2.13 cannot run forward-only, ``eval_step`` must refuse on every rank
before any communication.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from tests.helpers.parity import max_abs_diff, quiet_transformers
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 2
BATCH_SIZE = 6
N_MICROBATCHES = 4
#: What torch 2.13 runs forward-only (``schedule.eval``).
FORWARD_ONLY = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
#: The V schedules, where ``schedule.eval`` fails and ``eval_step`` refuses.
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class Case:
    schedule: str
    tied: bool = False
    #: Attention dropout 0.5 in the text model; evaluations only.
    dropout: bool = False
    #: ``build_vlm_pipeline(dtype=...)`` as a string; evaluations only.
    dtype: str | None = None

    @property
    def key(self) -> str:
        parts = [self.schedule]
        parts += [name for name in ("tied", "dropout") if getattr(self, name)]
        parts += [self.dtype] if self.dtype else []
        return "/".join(parts)

    @property
    def evaluates(self) -> bool:
        return self.schedule in FORWARD_ONLY

    @property
    def trains(self) -> bool:
        return self.evaluates and not self.dropout and self.dtype is None


def cases() -> list[Case]:
    return [
        *(Case(schedule) for schedule in (*FORWARD_ONLY, *V_SHAPED)),
        Case("1F1B", tied=True),
        Case("ZBVZeroBubble", tied=True),
        Case("1F1B", dropout=True),
        Case("1F1B", dtype="bfloat16"),
    ]


def _batch(config: Any, seed: int) -> dict[str, torch.Tensor]:
    from pp_media.testing import default_seq_len, synthetic_batch

    seq_len = default_seq_len(config, videos=True)
    batch = synthetic_batch(config, BATCH_SIZE, seq_len, seed=seed, videos=True)
    del batch["mm_token_type_ids"]  # derived by the step, and by reference_batch
    return batch


def _modules(pipe: Any) -> Iterator[torch.nn.Module]:
    for stage in pipe.stages:
        yield from stage.modules()


def _grads(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in named.items()}


def _same_grads(
    named: dict[str, torch.nn.Parameter], before: dict[str, torch.Tensor | None]
) -> bool:
    for name, param in named.items():
        if (param.grad is None) != (before[name] is None):
            return False
        if param.grad is not None and not torch.equal(param.grad, before[name]):
            return False
    return True


def _reference_eval(reference: Any, batch: dict[str, Any]) -> float:
    reference.eval()
    with torch.no_grad():
        loss = reference(**batch).loss.item()
    reference.train()
    return loss


def run_case(case: Case) -> dict[str, Any]:
    import transformers

    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    config = tiny_config("qwen2_vl", tie_word_embeddings=case.tied)
    if case.dropout:
        config.text_config.attention_dropout = 0.5
    torch.manual_seed(0)
    source = transformers.AutoModelForImageTextToText.from_config(config)
    source.train()
    reference = copy.deepcopy(source)
    pipe = build_vlm_pipeline(
        source,
        schedule=case.schedule,
        n_microbatches=N_MICROBATCHES,
        device="cpu",
        dtype=case.dtype,
    )
    pairs = pipe.named_parameters()
    named = dict(pipe.named_parameters(remove_duplicate=False))
    full = dict(reference.named_parameters(remove_duplicate=False))
    batch_a, batch_b = _batch(config, 1), _batch(config, 3)
    ref_a, ref_b = pipe.reference_batch(batch_a), pipe.reference_batch(batch_b)

    result: dict[str, Any] = {
        "case": asdict(case),
        "has_last_stage": pipe.has_last_stage,
        "last_stage_rank": pipe.last_stage_rank,
        "pairs_is_iterator": isinstance(pairs, Iterator),
        "names": [name for name, _ in pairs],
        "names_all": sorted(named),
        "dtypes": sorted({str(p.dtype) for p in named.values()}),
        "reference_has_mm_token_type_ids": "mm_token_type_ids" in ref_a,
    }
    if not case.evaluates:
        try:
            pipe.eval_step(batch_a)
        except ValueError as error:
            result["refused"] = str(error)
        result["no_grads_after_eval"] = all(p.grad is None for p in named.values())
        return result
    ref_eval = _reference_eval(reference, ref_a)
    loss = pipe.eval_step(batch_a)
    result["eval_first"] = None if loss is None else loss.item()
    result["ref_eval"] = ref_eval
    result["broadcast"] = pipe.broadcast_loss(loss).item()
    result["no_grads_after_eval"] = all(p.grad is None for p in named.values())
    result["train_mode_after_eval"] = all(module.training for module in _modules(pipe))
    if case.dropout:
        # What a pipeline left in train mode would compute instead (dropout at random).
        with torch.no_grad():
            result["ref_train_mode_loss"] = reference(**ref_a).loss.item()
        for stage in pipe.stages:
            stage.eval()
        pipe.eval_step(batch_a)
        result["eval_mode_kept"] = not any(module.training for module in _modules(pipe))
    if not case.trains:
        return result

    ref_loss = reference(**ref_b).loss
    ref_loss.backward()
    loss = pipe.step(batch_b)
    grad_err, worst, _ = max_abs_diff(named, {n: p.grad for n, p in full.items()}, grads=True)
    result["train"] = {
        "loss": None if loss is None else loss.item(),
        "ref_loss": ref_loss.item(),
        "grad_err": grad_err,
        "grad_worst": worst,
    }

    before = _grads(named)
    loss = pipe.eval_step(batch_a)
    result["eval_again"] = None if loss is None else loss.item()
    result["grads_unchanged"] = _same_grads(named, before)
    result["train_mode_again"] = all(module.training for module in _modules(pipe))

    reference(**ref_b).loss.backward()
    loss = pipe.step(batch_b)
    grad_err, worst, _ = max_abs_diff(named, {n: p.grad for n, p in full.items()}, grads=True)
    result["train_again"] = {
        "loss": None if loss is None else loss.item(),
        "grad_err": grad_err,
        "grad_worst": worst,
    }
    return result


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank: every case, in order."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, case)) for case in cases())
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
