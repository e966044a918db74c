"""Hugging Face stage splitting against the unsplit model, on 2 real gloo ranks.

Each case builds the same tiny VLM on both ranks, runs the unsplit copy on the whole batch as
the reference, then ``build_vlm_pipeline(...).step(batch)`` and records, per rank, the largest
loss and gradient (and, with an optimizer, parameter) differences from the reference, the
parameter names and sizes the rank holds, and the tied-embedding state. With
``token_type_ids`` in the batch (Gemma3, PaliGemma) it also records how far the unsplit model's
loss and gradients move without them (plain causal masks): the size of the error a lost
bidirectional mask would make.
``test_hf_parity.py`` spawns ``worker`` once for all cases and asserts on the JSON it writes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
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
BATCH_SEED = 1
TINY_LAYERS = 4
SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)


@dataclass(frozen=True)
class Case:
    """One pipelined step (or ``steps`` SGD steps) beside the unsplit reference."""

    model_type: str
    schedule: str
    #: "images" (0..3 per sample), "videos" (images and videos), "one_image" (LLaVA
    #: ``[B, C, H, W]``, exactly one image per sample) or "text_only".
    batch: str = "images"
    tied: bool = False
    #: Remove ``mm_token_type_ids`` from the pipeline's batch (the pipeline derives it).
    drop_mm_token_type_ids: bool = False
    #: Save the model with ``save_pretrained`` and build both runs from the directory.
    checkpoint: bool = False
    #: Swap two equal-grid images of different samples in the pipeline's batch only.
    misroute: bool = False
    #: Optimizer steps (SGD, lr 0.5) after each pipeline step; 0: one step, no optimizer.
    sgd_steps: int = 0
    #: Seed of the (first) batch. With videos, seed 1 gives microbatches of images and videos,
    #: of text only and of one image; seed 3 gives video-only, image-only and text-only ones.
    seed: int = BATCH_SEED
    #: ``build_vlm_pipeline(layers_per_stage=)``; None: balanced.
    layers_per_stage: tuple[int, ...] | None = None
    #: Decoder layers of the tiny model.
    num_layers: int = TINY_LAYERS
    #: Remove ``token_type_ids`` from the batch of both runs (plain causal masks).
    drop_token_type_ids: bool = False

    @property
    def key(self) -> str:
        parts = [self.model_type, self.batch, self.schedule]
        for flag in ("tied", "checkpoint", "misroute"):
            if getattr(self, flag):
                parts.append(flag)
        if self.drop_mm_token_type_ids:
            parts.append("no_mm_token_type_ids")
        if self.drop_token_type_ids:
            parts.append("no_token_type_ids")
        if self.sgd_steps:
            parts.append(f"sgd{self.sgd_steps}")
        if self.seed != BATCH_SEED:
            parts.append(f"seed{self.seed}")
        if self.num_layers != TINY_LAYERS:
            parts.append(f"{self.num_layers}layers")
        if self.layers_per_stage is not None:
            parts.append("layers" + "-".join(map(str, self.layers_per_stage)))
        return "/".join(parts)


def cases() -> list[Case]:
    """Every case the test asserts on, in the order both ranks run them."""
    result = [Case("qwen2_vl", schedule) for schedule in SCHEDULES]
    result += [
        Case("qwen2_vl", "1F1B", batch="videos"),
        Case("qwen2_vl", "Interleaved1F1B", batch="videos", seed=3),
        Case("qwen2_5_vl", "1F1B", batch="videos", seed=3),
        Case("qwen2_5_vl", "ZBVZeroBubble", batch="videos"),
        Case("llava", "1F1B"),
        Case("llava", "Interleaved1F1B"),
        Case("llava", "1F1B", batch="one_image"),
        Case("qwen2_vl", "1F1B", batch="videos", drop_mm_token_type_ids=True),
        Case("qwen2_vl", "1F1B", batch="videos", drop_mm_token_type_ids=True, seed=3),
        Case("qwen2_vl", "1F1B", batch="text_only"),
        Case("qwen2_vl", "Interleaved1F1B", batch="videos", layers_per_stage=(0, 2, 2, 0)),
        Case("qwen2_vl", "1F1B", layers_per_stage=(3, 1)),
        Case("qwen2_vl", "1F1B", tied=True, sgd_steps=3),
        Case("qwen2_vl", "ZBVZeroBubble", tied=True, sgd_steps=3),
        Case("qwen2_vl", "1F1B", checkpoint=True),
        Case("qwen2_vl", "1F1B", tied=True, checkpoint=True),
        Case("qwen2_vl", "1F1B", misroute=True),
        # Later families. GLM-4V: images only (transformers cannot mix images and videos in
        # one GLM-4V forward). Gemma3 interleaved: 6 layers as 1, 2, 2, 1, so two stages
        # hold a full layer followed by a sliding one (global layers 1, 2 and 3, 4). Gemma3
        # tied: 2 SGD steps, not 3 (the ulp-level differences of each step grow about 3-4x
        # a step there: gradients differ by 5.6e-8, 1.5e-7, then 6.2e-7 in the third step,
        # too close to the 1e-6 tolerance).
        Case("glm4v", "1F1B"),
        Case("glm4v", "GPipe"),
        Case("mistral3", "1F1B"),
        Case("gemma3", "1F1B"),
        Case("gemma3", "Interleaved1F1B", num_layers=6, layers_per_stage=(1, 2, 2, 1)),
        Case("gemma3", "1F1B", drop_token_type_ids=True),
        Case("gemma3", "1F1B", tied=True, sgd_steps=2),
        Case("paligemma", "1F1B"),
        Case("paligemma", "ZBVZeroBubble"),
    ]
    return result


# --- batches ---------------------------------------------------------------------------


def one_image_per_sample_batch(config: Any, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA batch with exactly one image per sample: ``pixel_values [B, C, H, W]``, built
    with the real image processor (``synthetic_batch`` always makes sample 0 text-only)."""
    from PIL import Image

    from pp_media._cli.tiny_models import image_processor

    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    images = [
        Image.fromarray(
            torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for _ in range(BATCH_SIZE)
    ]
    pixel_values = image_processor(config)(images=images, return_tensors="pt")["pixel_values"]
    per_image = (size // config.vision_config.patch_size) ** 2  # 16 with the tiny config
    seq_len = 32
    input_ids = torch.zeros(BATCH_SIZE, seq_len, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for i in range(BATCH_SIZE):
        text = int(torch.randint(4, 12, (1,), generator=generator))
        row = [
            *torch.randint(10, 900, (1 + i % 3,), generator=generator).tolist(),
            *[config.image_token_id] * per_image,
            *torch.randint(10, 900, (text,), generator=generator).tolist(),
        ]
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(
        (input_ids == config.image_token_id) | (attention_mask == 0), -100
    )
    return {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


def with_prompt_prefix(batch: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """PaliGemma's prefix-LM layout, as its processor emits it for a prompt and a suffix:
    ``token_type_ids`` 0 on the prefix (the images and the prompt: here every token up to 2
    after the last image, or the first 3 of a text-only sample) and on padding, 1 on the
    suffix, which alone carries labels. ``synthetic_batch`` labels every text token, so its
    ``token_type_ids`` are 1 everywhere and the prefix mask would never be exercised."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    positions = torch.arange(input_ids.shape[1])
    token_type_ids = torch.zeros_like(input_ids)
    for i in range(input_ids.shape[0]):
        images = (input_ids[i] == config.image_token_id).nonzero()
        prefix = int(images.max()) + 3 if len(images) else 3
        token_type_ids[i] = ((positions >= prefix) & (attention_mask[i] == 1)).long()
    labels = batch["labels"].masked_fill(token_type_ids == 0, -100)
    return {**batch, "token_type_ids": token_type_ids, "labels": labels}


def make_batch(config: Any, case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The case's collated batch (what the reference model gets)."""
    from pp_media._cli.synthetic import default_seq_len, synthetic_batch

    if case.batch == "one_image":
        return one_image_per_sample_batch(config, seed)
    videos = case.batch == "videos"
    max_images = 0 if case.batch == "text_only" else 3
    seq_len = default_seq_len(config, videos=videos)
    batch = synthetic_batch(
        config, BATCH_SIZE, seq_len, seed=seed, max_images=max_images, videos=videos
    )
    if config.model_type == "paligemma":
        batch = with_prompt_prefix(batch, config)
    if case.drop_token_type_ids:
        del batch["token_type_ids"]
    return batch


def image_owners(batch: dict[str, torch.Tensor], config: Any) -> list[int]:
    """The sample each Qwen image belongs to (images fill samples' placeholders in order)."""
    merge = config.vision_config.spatial_merge_size
    tokens = (batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    per_sample = (batch["input_ids"] == config.image_token_id).sum(1).tolist()
    owners, sample = [], 0
    for n_tokens in tokens:
        while per_sample[sample] == 0:
            sample += 1
        owners.append(sample)
        per_sample[sample] -= n_tokens
    return owners


def misrouted(batch: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` whose pixels of two equal-grid images of different samples are
    swapped: every shape, count and placeholder still checks out, only the routing is wrong."""
    grids = batch["image_grid_thw"]
    owners = image_owners(batch, config)
    starts = [0, *grids.prod(-1).cumsum(0).tolist()]
    for i in range(len(owners)):
        for j in range(i + 1, len(owners)):
            if owners[i] != owners[j] and torch.equal(grids[i], grids[j]):
                pixels = batch["pixel_values"].clone()
                first = slice(starts[i], starts[i + 1])
                second = slice(starts[j], starts[j + 1])
                pixels[first], pixels[second] = batch["pixel_values"][second], pixels[first]
                return {**batch, "pixel_values": pixels}
    raise AssertionError("the misroute batch has no two equal-grid images of different samples")


# --- one case ----------------------------------------------------------------------------


def _tied_copies(pipe: Any) -> dict[str, Any]:
    """Whether this rank's embedding copy and the LM head copy are equal, bit for bit: the
    same Parameter when both stages are local, else compared through an all_gather."""
    named = dict(pipe.named_parameters(remove_duplicate=False))
    if pipe.tied.active:
        mine = (named[EMBED] if pipe.has_first_stage else named[HEAD]).detach().contiguous()
        gathered = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, mine, group=pipe.tied.group)
        return {"copies_equal": torch.equal(gathered[0], gathered[1]), "shared": False}
    if EMBED in named and HEAD in named:
        return {"copies_equal": named[EMBED] is named[HEAD], "shared": named[EMBED] is named[HEAD]}
    return {}


def new_model(config: Any) -> Any:
    """The case's random model. Gemma3's projector weight starts at zero, which would make
    every vision-tower gradient zero and the vision half of the check vacuous: it gets small
    random values from its own seeded generator instead."""
    import transformers

    model = transformers.AutoModelForImageTextToText.from_config(config)
    if config.model_type == "gemma3":
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        generator = torch.Generator().manual_seed(MODEL_SEED)
        with torch.no_grad():
            weight.copy_(0.02 * torch.randn(weight.shape, generator=generator))
    return model


def mask_effect(
    reference: Any, batch: dict[str, torch.Tensor], ref_loss: float, ref_grads: dict[str, Any]
) -> dict[str, float]:
    """How far the unsplit model's loss and gradients move when ``token_type_ids`` are left
    out (plain causal masks): what a pipeline that lost the bidirectional masks would be off
    by. ``autograd.grad`` leaves the reference's ``.grad`` alone."""
    params = dict(reference.named_parameters())
    causal = {name: value for name, value in batch.items() if name != "token_type_ids"}
    loss = reference(**causal).loss
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grad = 0.0
    for name, value in zip(params, grads, strict=True):
        ref = ref_grads[name]
        if value is not None and ref is not None:
            grad = max(grad, (value - ref).abs().max().item())
    return {"loss": abs(loss.item() - ref_loss), "grad": grad}


def run_case(rank: int, case: Case, workdir: str) -> dict[str, Any]:
    """Build, step and compare; the per-rank result of ``case``."""
    import transformers

    from pp_media._cli.tiny_models import tiny_config
    from pp_media._hf.families import adapter_for
    from pp_media._hf.pipeline import build_vlm_pipeline

    config = tiny_config(case.model_type, num_layers=case.num_layers, tie_word_embeddings=case.tied)
    torch.manual_seed(MODEL_SEED)
    if case.checkpoint:
        path = Path(workdir, case.key.replace("/", "_"))
        if rank == 0:
            new_model(config).save_pretrained(path)
        dist.barrier()
        reference = transformers.AutoModelForImageTextToText.from_pretrained(path)
        source: Any = str(path)
    else:
        source = new_model(config)
        source.train()
        reference = copy.deepcopy(source)
    reference.train()
    pipe = build_vlm_pipeline(
        source,
        schedule=case.schedule,
        n_microbatches=N_MICROBATCHES,
        layers_per_stage=case.layers_per_stage,
        device="cpu",
    )

    full = dict(reference.named_parameters(remove_duplicate=False))
    named = dict(pipe.named_parameters(remove_duplicate=False))
    result: dict[str, Any] = {
        "case": asdict(case),
        "stages": [stage.stage_index for stage in pipe.stages],
        "stage_layers": [list(stage.layer_indices) for stage in pipe.stages],
        "layer_types": getattr(config.get_text_config(), "layer_types", None),
        "has_last_stage": pipe.has_last_stage,
        "names": sorted(named),
        "full_names": sorted(full),
        "local_numel": sum(p.numel() for p in pipe.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
        "tied_active": pipe.tied.active,
        "reference_tied": reference.get_output_embeddings().weight
        is reference.get_input_embeddings().weight,
        "steps": [],
    }
    # The vision encoder without a separate projector (Gemma3's zero-initialised projector
    # weight gets gradients even while every vision-tower gradient is zero).
    tower = adapter_for(config).vision_paths[0] + "."
    vision_names = [name for name in full if name.startswith(tower)]
    sgd = case.sgd_steps > 0
    if sgd:
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
    for step in range(max(case.sgd_steps, 1)):
        batch = make_batch(config, case, case.seed + step)
        result["batch_keys"] = sorted(batch)
        result["media_shapes"] = {
            name: list(value.shape) for name, value in batch.items() if "pixel" in name
        }
        result["placeholders"] = {
            kind: (batch["input_ids"] == getattr(config, f"{kind}_token_id")).sum(1).tolist()
            for kind in ("image", "video")
            if getattr(config, f"{kind}_token_id", None) is not None
        }
        result["image_runs"] = placeholder_runs(batch["input_ids"], config.image_token_id)
        if "image_sizes" in batch:
            result["image_sizes"] = batch["image_sizes"].tolist()
        if "token_type_ids" in batch:
            result["token_type_ids"] = batch["token_type_ids"].tolist()
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        ref_grads = {name: p.grad for name, p in full.items()}
        if step == 0 and "token_type_ids" in batch:
            result["mask_effect"] = mask_effect(reference, batch, ref_loss.item(), ref_grads)

        pipe_batch = dict(batch)
        if case.drop_mm_token_type_ids:
            del pipe_batch["mm_token_type_ids"]
        if case.misroute:
            pipe_batch = misrouted(pipe_batch, config)
        before = snapshot(pipe_batch)
        loss = pipe.step(pipe_batch)
        record = compare_step(named, ref_grads, loss, ref_loss)
        record["batch_unchanged"] = unchanged(pipe_batch, before)
        record["ref_vision_grad"] = largest(ref_grads[name] for name in vision_names)
        if sgd:
            record.update(step_both_and_compare(ref_optimizer, optimizer, named, full))
        if case.tied:
            record.update(_tied_copies(pipe))
        result["steps"].append(record)
    return result


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every case, in order."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, rank, case, out_dir)) for case in cases())
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
