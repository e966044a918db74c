"""Measure the MoE family survey (docs/moe_survey.md): per family, whether its tiny random model
(tests/moe_survey_configs.py) runs forward and backward with labels and router logits on CPU,
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
from tests import moe_survey_configs as moe


def _llama4_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Llama4ForConditionalGeneration.forward fails in transformers 5.24 (it reads
    ``image_outputs`` from the language model's output); this is its own computation up to
    that line: image features, projector, placeholder scatter, language model with labels."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    flat = features.last_hidden_state.reshape(-1, features.last_hidden_state.shape[-1])
    projected = model.multi_modal_projector(flat)
    mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, projected)
    out = model.language_model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        output_router_logits=True,
    )
    return out.loss


def _step(model_type: str, model: Any, batch: dict[str, Any]) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if model_type == "llama4":
        loss = _llama4_loss(model, batch)
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
    for model_type in moe.BUILDERS:
        try:
            models[model_type] = moe.tiny_model(model_type)
        except Exception as error:
            notes[model_type] = f"build: {type(error).__name__}: {error}"
            continue
        batches[model_type] = moe.tiny_batch(
            model_type, models[model_type].config, pad=(0, 3, 0, 5)
        )
        if model_type == "llama4":
            notes[model_type] = _top_forward_error(models[model_type], batches[model_type])

    times: dict[str, list[float]] = {t: [] for t in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        for model_type, model in models.items():
            times[model_type].append(_step(model_type, model, batches[model_type]))

    print(f"torch threads {args.threads}, {args.rounds} rounds, batch of 4 samples x 24 tokens")
    print("| family | params | fwd+bwd ms (median) | router layers | note |")
    print("|---|---|---|---|---|")
    for model_type, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        layers = len(moe.routers(model, model_type)[0])
        ms = 1000 * statistics.median(times[model_type][1:])
        print(f"| {model_type} | {params} | {ms:.1f} | {layers} | {notes.get(model_type, '')} |")

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
            chunks = moe.microbatches(model_type, batch, n)
            mean = sum(_aux(model, model_type, c, spec).item() for c in chunks) / n
            row += [f"{mean:.6f}", f"{mean - whole:+.2e}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
