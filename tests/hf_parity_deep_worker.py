"""Deeper Hugging Face parity cases on 2 real gloo ranks: Qwen3-VL deepstack, Idefics3 /
SmolVLM per-sample pixel rows, InternVL tiles per image, tied Qwen3-VL through SGD steps,
Qwen3.5's mixed linear- and full-attention decoder, Kimi-K2.5's flat patches and time-pooled
videos (DeepSeek-V3 MoE text model), Step3p7's global views and local crops (MoE text model).

Each case builds the same tiny VLM on both ranks (``tiny_config``, fp32, dropout 0, train
mode; always ``from_config``, never a checkpoint); a deep copy is the reference, run on the
whole batch with its own ``labels``. The pipeline from ``build_vlm_pipeline`` then runs the
same batch (6 samples, 4 microbatches) and each rank records its loss and gradient differences
from the reference, by the unsplit model's parameter names. Besides, per case: what the batch
holds (placeholders per sample, pixel rows, tiles per image, video frames, local crops), the
stages' layers and the layer types each stage's text model sees and holds, what every later
stage received from the previous one (forward pre-hooks: how many tensors, and how large the
carried deepstack features were), and for Qwen3-VL the reference's loss with deepstack switched
off. ``test_hf_parity_deep.py`` spawns ``worker`` once for all cases and asserts on the JSON.

Kimi-K2.5's and Step3p7's image processors need torchvision, which is not importable beside
the CPU build of torch here: ``synthetic_batch`` gets their media from the stand-ins that
``tiny_models.image_processor`` returns (``FlatPatchLayout``, ``Step3Layout``), which emit the
processors' field names and layout, not their resized pixel values.

Self-contained on purpose (it does not import ``hf_parity_worker``, which changes often); the
rank plumbing and the comparisons come from ``tests.helpers.ranks`` and ``tests.helpers.parity``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from tests.helpers.parity import (
    EMBED,
    HEAD,
    compare_step,
    largest,
    placeholder_runs,
    quiet_transformers,
    snapshot,
    step_both_and_compare,
    unchanged,
)
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 2
BATCH_SIZE = 6
N_MICROBATCHES = 4
MODEL_SEED = 0
SGD_LR = 0.5


@dataclass(frozen=True)
class Case:
    """One pipelined step (or ``sgd_steps`` SGD steps) beside the unsplit reference."""

    model_type: str
    schedule: str
    #: ``synthetic_batch(videos=)``: every third sample also carries one video.
    videos: bool = False
    tied: bool = False
    #: SGD steps (lr ``SGD_LR``) after each pipeline step, one batch each; 0: one step, no
    #: optimizer.
    sgd_steps: int = 0
    #: Seed of the (first) batch; chosen per case for what the batch must hold (see ``cases``).
    seed: int = 1

    @property
    def key(self) -> str:
        parts = [self.model_type, "videos" if self.videos else "images", self.schedule]
        if self.tied:
            parts.append("tied")
        if self.sgd_steps:
            parts.append(f"sgd{self.sgd_steps}")
        parts.append(f"seed{self.seed}")
        return "/".join(parts)


def cases() -> list[Case]:
    """Every case, in the order both ranks run them. Microbatches are samples [0, 2), [2, 4),
    [4, 5), [5, 6). Seeds: Qwen3-VL seed 1 leaves microbatch 1 text-only, seed 7 microbatch 0;
    with videos, seed 1 gives microbatches of images and a video, and seed 3 video-only ones.
    Idefics3 / SmolVLM seed 1 leaves microbatch 1 text-only, seed 7 microbatch 0. InternVL
    seeds 1 and 2 give a sample with images of 1 and 3 tiles. Qwen3.5 and Kimi-K2.5 draw the
    same images as Qwen3-VL (seed 1: microbatch 1 text-only; seed 7: microbatch 0), with
    videos (grid ``t`` 2) beside images in samples 1 and 4. Step3p7 (one image per sample, no
    text-only sample): seed 1 gives local crops in samples 1 to 4 (microbatch 3 none), seed 3
    in samples 2, 3 and 5 (microbatches 0 and 2 none)."""
    return [
        Case("qwen3_vl", "1F1B"),
        Case("qwen3_vl", "Interleaved1F1B"),
        Case("qwen3_vl", "ZBVZeroBubble", seed=7),
        Case("qwen3_vl", "1F1B", videos=True),
        Case("qwen3_vl", "Interleaved1F1B", videos=True, seed=3),
        Case("idefics3", "1F1B"),
        Case("idefics3", "Interleaved1F1B", seed=7),
        Case("smolvlm", "1F1B"),
        Case("internvl", "1F1B"),
        Case("internvl", "GPipe", seed=2),
        Case("qwen3_vl", "1F1B", tied=True, sgd_steps=2),
        Case("qwen3_5", "1F1B"),
        Case("qwen3_5", "Interleaved1F1B", seed=7),
        Case("qwen3_5", "1F1B", videos=True),
        Case("kimi_k25", "1F1B"),
        Case("kimi_k25", "1F1B", videos=True),
        Case("step3p7", "1F1B"),
        Case("step3p7", "GPipe", seed=3),
    ]


# --- what a batch holds --------------------------------------------------------------------


def describe_batch(batch: dict[str, torch.Tensor], config: Any) -> dict[str, Any]:
    """The facts about ``batch`` that the test checks the case's claims against."""
    from pp_media._core.bounds import sample_bounds

    input_ids = batch["input_ids"]
    info: dict[str, Any] = {
        "keys": sorted(batch),
        "bounds": list(sample_bounds(input_ids.shape[0], N_MICROBATCHES)),
        "shapes": {name: list(value.shape) for name, value in batch.items()},
        "image_tokens": (input_ids == config.image_token_id).sum(1).tolist(),
        "image_runs": placeholder_runs(input_ids, config.image_token_id),
    }
    video_token = getattr(config, "video_token_id", None)
    if video_token is not None:
        info["video_tokens"] = (input_ids == video_token).sum(1).tolist()
        info["video_runs"] = placeholder_runs(input_ids, video_token)
    for name in ("image_grid_thw", "video_grid_thw", "num_patches", "num_local_patches"):
        if name in batch:
            info[name] = batch[name].tolist()
    if config.model_type in ("idefics3", "smolvlm") and "pixel_values" in batch:
        pixels = batch["pixel_values"]
        info["real_crops"] = (~(pixels == 0).flatten(2).all(-1)).sum(1).tolist()
        info["zero_rows"] = [bool((row == 0).all()) for row in pixels]
    return info


def stage_layer_types(stage: Any) -> dict[str, list[Any]]:
    """The layer types of one stage's text model: ``view``, its own (cut) config's
    ``layer_types``; ``modules``, each held decoder layer's ``block_type`` (Qwen3.5: which
    token mixer it was built with; None for families without one)."""
    text = stage.get_submodule(stage.adapter.text_model_path)
    return {
        "view": list(getattr(text.config, "layer_types", None) or []),
        "modules": [getattr(layer, "block_type", None) for layer in text.layers],
    }


# --- comparisons -----------------------------------------------------------------------------


def tied_copies(pipe: Any) -> dict[str, Any]:
    """Whether the embedding copy (stage 0's rank) and the LM head copy (last stage's rank)
    are equal bit for bit, compared through an all_gather over the tied group."""
    named = dict(pipe.named_parameters(remove_duplicate=False))
    if not pipe.tied.active:
        return {"copies_equal": None}
    mine = (named[EMBED] if pipe.has_first_stage else named[HEAD]).detach().contiguous()
    gathered = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, mine, group=pipe.tied.group)
    return {"copies_equal": torch.equal(gathered[0], gathered[1])}


def deepstack_off_loss(reference: Any, batch: dict[str, torch.Tensor]) -> float:
    """The unsplit model's loss with deepstack switched off: its text model's
    ``_deepstack_process`` returns the hidden states unchanged (patched on this one instance,
    in this worker only, and removed again). What a pipeline that lost the carried features
    would be near."""
    text = reference.model.language_model

    def unchanged(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    text._deepstack_process = unchanged
    try:
        with torch.no_grad():
            return reference(**batch).loss.item()
    finally:
        del text._deepstack_process


class Received:
    """Forward pre-hooks on this rank's stage modules: per stage, per microbatch, how many
    positional tensors it got, and the largest carried per-layer feature (inputs after
    hidden, position ids and the media-position mask, for stages after the first)."""

    def __init__(self, pipe: Any) -> None:
        self.calls: dict[int, list[dict[str, Any]]] = {}
        self.handles = [
            stage.register_forward_pre_hook(self._hook(stage), with_kwargs=True)
            for stage in pipe.stages
        ]

    def _hook(self, stage: Any) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            lead = 2 if stage.adapter.sends_position_ids else 1
            carried = args[lead + 1 :] if not stage.is_first else ()
            self.calls.setdefault(stage.stage_index, []).append(
                {
                    "n_args": len(args),
                    "n_carried": len(carried),
                    "carried_max": [largest([t.detach()]) for t in carried],
                }
            )

        return hook

    def remove(self) -> dict[str, list[dict[str, Any]]]:
        for handle in self.handles:
            handle.remove()
        return {str(index): calls for index, calls in self.calls.items()}


# --- one case --------------------------------------------------------------------------------


def run_case(rank: int, case: Case) -> dict[str, Any]:
    """Build, step and compare; the per-rank result of ``case``."""
    import transformers

    from pp_media._cli.synthetic import default_seq_len, synthetic_batch
    from pp_media._cli.tiny_models import tiny_config
    from pp_media._hf.families import adapter_for
    from pp_media._hf.pipeline import build_vlm_pipeline

    config = tiny_config(case.model_type, tie_word_embeddings=case.tied)
    adapter = adapter_for(config)
    torch.manual_seed(MODEL_SEED)
    source = transformers.AutoModelForImageTextToText.from_config(config)
    source.train()
    reference = copy.deepcopy(source)
    reference.train()
    pipe = build_vlm_pipeline(
        source, schedule=case.schedule, n_microbatches=N_MICROBATCHES, device="cpu"
    )
    full = dict(reference.named_parameters(remove_duplicate=False))
    named = dict(pipe.named_parameters(remove_duplicate=False))
    vision_names = [
        name for name in full if any(name.startswith(path + ".") for path in adapter.vision_paths)
    ]
    deepstack_names = [name for name in vision_names if ".deepstack_merger_list." in name]
    result: dict[str, Any] = {
        "case": asdict(case),
        "stages": [stage.stage_index for stage in pipe.stages],
        "stage_layers": {str(s.stage_index): list(s.layer_indices) for s in pipe.stages},
        "first_layers": {str(s.stage_index): s.first_layer for s in pipe.stages},
        "layer_types": getattr(config.get_text_config(), "layer_types", None),
        "stage_layer_types": {str(s.stage_index): stage_layer_types(s) for s in pipe.stages},
        "layer_feature_count": adapter.layer_feature_count(config),
        "n_layers": config.get_text_config().num_hidden_layers,
        "has_first_stage": pipe.has_first_stage,
        "has_last_stage": pipe.has_last_stage,
        "names": sorted(named),
        "full_names": sorted(full),
        "vision_names": vision_names,
        "deepstack_names": deepstack_names,
        "tied_active": pipe.tied.active,
        "reference_tied": reference.get_output_embeddings().weight
        is reference.get_input_embeddings().weight,
        "steps": [],
    }
    if case.sgd_steps:
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=SGD_LR)
        optimizer = torch.optim.SGD(pipe.parameters(), lr=SGD_LR)
    seq_len = default_seq_len(config, videos=case.videos)
    for step in range(max(case.sgd_steps, 1)):
        batch = synthetic_batch(
            config, BATCH_SIZE, seq_len, seed=case.seed + step, videos=case.videos
        )
        if step == 0:
            result["batch"] = describe_batch(batch, config)
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        ref_grads = {name: p.grad for name, p in full.items()}
        if step == 0 and adapter.layer_feature_count(config):
            result["deepstack_off_loss"] = deepstack_off_loss(reference, batch)

        before = snapshot(batch)
        received = Received(pipe)
        loss = pipe.step(batch)
        record = compare_step(named, ref_grads, loss, ref_loss)
        record["received"] = received.remove()
        record["batch_unchanged"] = unchanged(batch, before)
        record["compared"] = len(named)
        record["ref_vision_grad"] = largest(ref_grads[name] for name in vision_names)
        record["vision_grad"] = largest(named[n].grad for n in vision_names if n in named)
        record["ref_deepstack_grad"] = largest(ref_grads[name] for name in deepstack_names)
        record["deepstack_grad"] = largest(named[n].grad for n in deepstack_names if n in named)
        if case.sgd_steps:
            record.update(step_both_and_compare(ref_optimizer, optimizer, named, full))
        if case.tied:
            record.update(tied_copies(pipe))
        result["steps"].append(record)
    return result


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every case, in order."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, rank, case)) for case in cases())
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
