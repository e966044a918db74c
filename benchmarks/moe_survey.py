"""Measure the MoE family survey (docs/moe_survey.md): per family, whether its tiny random model
(pp_media/testing/_moe_survey.py) runs forward and backward with labels and router logits on CPU,
how long that takes (median over interleaved rounds), and, for the families whose loss adds the
router aux loss, how far the per-microbatch form is from the whole-batch one.

    python benchmarks/moe_survey.py [--rounds 5] [--threads 1]

Times are noisy on a shared machine; families are interleaved round by round so that load
affects all of them alike. The per-microbatch numbers are exact (no timing involved).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_media._hf.router_loss import RouterLoss, recording_router_logits
from pp_media.testing import _moe_survey as moe
from pp_media.testing import reference_loss


def _step(model_type: str, model: Any, batch: dict[str, Any]) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if model_type == "llama4":  # its forward fails in transformers 5.24: its own computation
        loss = reference_loss(model, batch)
    else:
        loss = model(**batch, output_router_logits=True).loss
    loss.backward()
    return time.perf_counter() - start


def _top_forward_error(model: Any, batch: dict[str, Any]) -> str:
    try:
        model(**batch, output_router_logits=True)
    except Exception as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return f"{type(error).__name__}: {error} ({Path(frame.filename).name}:{frame.lineno})"
    return ""


def _aux(model: Any, model_type: str, batch: dict[str, Any], spec: RouterLoss) -> torch.Tensor:
    modules, index = moe.routers(model, model_type)
    with torch.no_grad(), recording_router_logits(modules, index) as recorded:
        model(**batch, output_router_logits=True)
    return spec.aux_loss(spec.accumulate(spec.zeros(), recorded, batch["attention_mask"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models, batches, notes = {}, {}, {}
    for model_type in moe.MODEL_TYPES:
        try:
            models[model_type] = moe.tiny_model(model_type)
        except Exception as error:
            notes[model_type] = f"build: {type(error).__name__}: {error}"
            continue
        batches[model_type] = moe.tiny_batch(models[model_type].config)
        if model_type == "llama4":
            notes[model_type] = _top_forward_error(models[model_type], batches[model_type])

    times: dict[str, list[float]] = {t: [] for t in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        for model_type, model in models.items():
            times[model_type].append(_step(model_type, model, batches[model_type]))

    rounds = f"torch threads {args.threads}, {args.rounds} rounds"
    print(f"{rounds}, synthetic batches of {moe.BATCH_SIZE} samples padded to the seq len")
    print("| family | params | seq len | fwd+bwd ms (median) | router layers | note |")
    print("|---|---|---|---|---|---|")
    for model_type, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        tokens = batches[model_type]["input_ids"].shape[1]
        layers = len(moe.routers(model, model_type)[0])
        ms = 1000 * statistics.median(times[model_type][1:])
        note = notes.get(model_type, "")
        print(f"| {model_type} | {params} | {tokens} | {ms:.1f} | {layers} | {note} |")

    print()
    print("Per-microbatch router aux (mean over microbatches) vs whole batch, same padded batch:")
    print("| family | whole-batch aux | M=2 mean | M=2 diff | M=4 mean | M=4 diff |")
    print("|---|---|---|---|---|---|")
    for model_type in moe.AUX_LOSS_FAMILIES:
        model, batch = models[model_type], batches[model_type]
        spec = RouterLoss.from_text_config(model.config.get_text_config())
        whole = _aux(model, model_type, batch, spec).item()
        row = [model_type, f"{whole:.6f}"]
        for n in (2, 4):
            chunks = moe.microbatches(model.config, batch, n)
            mean = sum(_aux(model, model_type, c, spec).item() for c in chunks) / n
            row += [f"{mean:.6f}", f"{mean - whole:+.2e}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
