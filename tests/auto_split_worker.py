"""``layers_per_stage="auto"`` and stages without decoder layers, against the unsplit model.

Each case builds the same tiny VLM on both ranks, runs a deep copy on the whole batch as the
reference, then ``build_vlm_pipeline(...).step(batch)``, and records per rank the chosen split,
its cost estimate and the largest loss and gradient differences from the reference.
``test_auto_split_parity.py`` spawns ``worker`` once for all cases.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from tests.helpers.parity import compare_step, quiet_transformers, snapshot, unchanged
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 2
BATCH_SIZE = 6
N_MICROBATCHES = 4
MODEL_SEED = 0
BATCH_SEED = 1


@dataclass(frozen=True)
class Case:
    model_type: str
    schedule: str
    #: ``build_vlm_pipeline(layers_per_stage=)``: "auto" or a string such as "0,4".
    layers_per_stage: str
    #: Pass the step's batch as ``sample_batch`` (measured costs); else the FLOP model.
    measure: bool = False

    @property
    def key(self) -> str:
        how = "/measured" if self.measure else ""
        return f"{self.model_type}/{self.schedule}/{self.layers_per_stage}{how}"


CASES = (
    Case("qwen2_vl", "1F1B", "auto", measure=True),
    Case("qwen2_vl", "1F1B", "0,4"),
    Case("qwen2_vl", "Interleaved1F1B", "auto"),
    Case("qwen2_vl", "ZBVZeroBubble", "auto"),
    Case("qwen3_vl", "1F1B", "0,4"),
    Case("qwen3_vl", "Interleaved1F1B", "auto"),
)


def run_case(case: Case) -> dict[str, Any]:
    import transformers

    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import default_seq_len, synthetic_batch, tiny_config

    config = tiny_config(case.model_type)
    torch.manual_seed(MODEL_SEED)
    source = transformers.AutoModelForImageTextToText.from_config(config)
    source.train()
    reference = copy.deepcopy(source)
    batch = synthetic_batch(
        config, BATCH_SIZE, default_seq_len(config, videos=False), seed=BATCH_SEED, max_images=3
    )
    pipe = build_vlm_pipeline(
        source,
        schedule=case.schedule,
        n_microbatches=N_MICROBATCHES,
        layers_per_stage=case.layers_per_stage,
        sample_batch=batch if case.measure else None,
        device="cpu",
    )
    full = dict(reference.named_parameters(remove_duplicate=False))
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in full.items()}
    before = snapshot(batch)
    loss = pipe.step(batch)
    record = compare_step(
        dict(pipe.named_parameters(remove_duplicate=False)), ref_grads, loss, ref_loss
    )
    record["batch_unchanged"] = unchanged(batch, before)
    costs = pipe.layout.costs
    return {
        "case": asdict(case),
        "layers_per_stage": list(pipe.layout.layers_per_stage),
        "stages": [stage.stage_index for stage in pipe.stages],
        "has_last_stage": pipe.has_last_stage,
        "costs": None
        if costs is None
        else {
            "parts": asdict(costs.parts),
            "stages": list(costs.stages),
            "ranks": list(costs.ranks),
        },
        "steps": [record],
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every case, in order."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, case)) for case in CASES)
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
