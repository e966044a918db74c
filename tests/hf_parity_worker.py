"""The rank side of the Hugging Face parity harness: one table of cases, one way to run each.

Each case builds the same tiny VLM on both ranks (``pp_media.testing.tiny_config``, fp32,
dropout 0, train mode), runs the unsplit copy on the whole batch as the reference, then
``build_vlm_pipeline(...).step(batch)``, and records per rank: the loss and gradient (and, with
SGD steps, parameter) differences from the reference by the unsplit model's parameter names,
the names and sizes the rank holds, the stages' layers and the layer types each stage's text
model sees, what every later stage received from the previous one (forward pre-hooks), the
tied-embedding state, how large the vision gradients are, what the batch holds, and the
reference's loss without what the case must show to matter (``token_type_ids``: bidirectional
masks; Qwen3-VL's deepstack). ``test_hf_parity.py`` spawns ``worker`` once for all cases and
asserts on the JSON it writes.

A family is a row of ``CASES``: family, schedule, stages (``layers_per_stage``, decoder
layers), batch, SGD steps and tolerances, plus the flags of the few cases that build, feed or
compare differently (a checkpoint directory, a misrouted image, fields left out).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pp_media._hf.partition import SCHEDULE_NAMES
from tests.helpers.parity import (
    EMBED,
    HEAD,
    compare_step,
    largest,
    per_microbatch_router_loss,
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
SGD_LR = 0.5
#: Absolute fp32 tolerances: summation order only (see ``test_hf_parity.py``).
LOSS_TOLERANCE = 5e-6
GRAD_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Case:
    """One pipelined step (or ``sgd_steps`` SGD steps) beside the unsplit reference."""

    model_type: str
    schedule: str
    #: "images" (0..3 per sample), "videos" (images, and one video in every third sample),
    #: "one_image" (LLaVA ``[B, C, H, W]``, exactly one image per sample), "text_only", or
    #: "prefix" (images, with PaliGemma's prompt prefix and answer suffix).
    batch: str = "images"
    #: Seed of the (first) batch, chosen for what the batch must hold (``claims``).
    seed: int = BATCH_SEED
    #: ``build_vlm_pipeline(layers_per_stage=)``; None: balanced.
    layers_per_stage: tuple[int, ...] | None = None
    #: Decoder layers of the tiny model.
    num_layers: int = TINY_LAYERS
    #: SGD steps (lr ``SGD_LR``) after each pipeline step, one batch each; 0: one step.
    sgd_steps: int = 0
    tied: bool = False
    #: Save the model with ``save_pretrained`` and build both runs from the directory.
    checkpoint: bool = False
    #: Swap two equal-grid images of different samples in the pipeline's batch only: the
    #: comparison must fail (by ``test_hf_parity``'s factors).
    misroute: bool = False
    #: Remove ``mm_token_type_ids`` (and ernie's ``moe_mm_token_type_ids``) from the
    #: pipeline's batch (the pipeline derives them).
    drop_mm_token_type_ids: bool = False
    #: Remove ``token_type_ids`` from the batch of both runs (plain causal masks).
    drop_token_type_ids: bool = False
    #: Fields removed from the batch of both runs, as a processor that drops them emits it
    #: (Llama 4's ``aspect_ratios``: the pipeline then takes each image's tiles from its tokens).
    without: tuple[str, ...] = ()
    #: The router load-balancing loss: "" (the config's ``output_router_logits``, off in the
    #: fixtures), "config" (the config's flag set: transformers' rule), "override"
    #: (``build_vlm_pipeline(output_router_logits=True)``, the config's flag off). On, the
    #: reference applies transformers' formula per microbatch (``per_microbatch_router_loss``).
    aux: str = ""
    microbatches: int = N_MICROBATCHES
    #: After the step, also ``clip_grad_norm_`` (the norm only) and ``eval_step`` against the
    #: reference (the router loss: with the extra stage output and loss term).
    api_checks: bool = False
    #: Text-config settings from ``VARIANTS`` set on the tiny config before the model is built
    #: ("" for none).
    variant: str = ""
    #: What the batch must hold, checked by ``test_hf_parity``'s claim of that name
    #: ("text_only_microbatch", "image_beside_several", ...).
    claims: tuple[str, ...] = ()
    loss_tolerance: float = LOSS_TOLERANCE
    grad_tolerance: float = GRAD_TOLERANCE
    param_tolerance: float = PARAM_TOLERANCE

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
        parts += [f"no_{name}" for name in self.without]
        if self.variant:
            parts.append(self.variant)
        if self.sgd_steps:
            parts.append(f"sgd{self.sgd_steps}")
        if self.aux:
            parts.append(f"aux_{self.aux}")
        if self.microbatches != N_MICROBATCHES:
            parts.append(f"{self.microbatches}mb")
        if self.seed != BATCH_SEED:
            parts.append(f"seed{self.seed}")
        if self.num_layers != TINY_LAYERS:
            parts.append(f"{self.num_layers}layers")
        if self.layers_per_stage is not None:
            parts.append("layers" + "-".join(map(str, self.layers_per_stage)))
        return "/".join(parts)


#: ``Case.variant`` -> text-config settings: Gemma4 with its mixture-of-experts block beside
#: the dense MLP in every layer (Gemma4 26B-A4B's kind; its router records probabilities and
#: transformers adds no load-balancing loss, so the loss stays ``model(**batch).loss``).
VARIANTS: dict[str, dict[str, Any]] = {
    "moe": {
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
    },
}


#: Microbatches are samples [0, 2), [2, 4), [4, 5), [5, 6). Seeds, where they matter: Qwen2-VL
#: with videos, seed 1 gives microbatches of images and videos, of text only and of one image;
#: seed 3 video-only, image-only and text-only ones. Qwen3-VL, Qwen3.5, Kimi-K2.5, Idefics3 and
#: SmolVLM: seed 1 leaves microbatch 1 text-only, seed 7 microbatch 0 (Qwen3-VL videos: seed 1
#: microbatches of images and a video, seed 3 video-only ones). InternVL seeds 1 and 2 give a
#: sample with images of 1 and 3 tiles. Step3p7 (one image per sample): seed 1 gives local crops
#: in samples 1 to 4, seed 3 in samples 2, 3 and 5. LLaVA-NeXT / OneVision images per sample:
#: seed 1 [0, 3, 0, 0, 3, 1], seed 12 [0, 3, 2, 1, 1, 2], seed 9 [0, 0, 2, 1, 2, 0].
CASES: tuple[Case, ...] = (
    *(Case("qwen2_vl", schedule) for schedule in SCHEDULE_NAMES),
    Case("qwen2_vl", "1F1B", batch="videos"),
    Case("qwen2_vl", "Interleaved1F1B", batch="videos", seed=3, claims=("video_only_mb",)),
    Case("qwen2_5_vl", "1F1B", batch="videos", seed=3, claims=("video_only_mb",)),
    Case("qwen2_5_vl", "ZBVZeroBubble", batch="videos"),
    Case("llava", "1F1B", claims=("several_images",)),
    Case("llava", "Interleaved1F1B", claims=("several_images",)),
    Case("llava", "1F1B", batch="one_image"),
    Case("qwen2_vl", "1F1B", batch="videos", drop_mm_token_type_ids=True),
    Case(
        "qwen2_vl",
        "1F1B",
        batch="videos",
        drop_mm_token_type_ids=True,
        seed=3,
        claims=("video_only_mb",),
    ),
    Case("qwen2_vl", "1F1B", batch="text_only"),
    Case("qwen2_vl", "Interleaved1F1B", batch="videos", layers_per_stage=(0, 2, 2, 0)),
    Case("qwen2_vl", "1F1B", layers_per_stage=(3, 1)),
    Case("qwen2_vl", "1F1B", tied=True, sgd_steps=3),
    Case("qwen2_vl", "ZBVZeroBubble", tied=True, sgd_steps=3),
    Case("qwen2_vl", "1F1B", checkpoint=True),
    Case("qwen2_vl", "1F1B", tied=True, checkpoint=True),
    Case("qwen2_vl", "1F1B", misroute=True),
    # GLM-4V: images only (transformers cannot mix images and videos in one GLM-4V forward).
    Case("glm4v", "1F1B", claims=("several_images",)),
    Case("glm4v", "GPipe", claims=("several_images",)),
    Case("mistral3", "1F1B", claims=("several_images",)),
    Case("gemma3", "1F1B", claims=("several_images",)),
    # 6 layers as 1, 2, 2, 1: two stages hold a full layer followed by a sliding one.
    Case(
        "gemma3",
        "Interleaved1F1B",
        num_layers=6,
        layers_per_stage=(1, 2, 2, 1),
        claims=("several_images", "full_and_sliding_stage"),
    ),
    Case("gemma3", "1F1B", drop_token_type_ids=True, claims=("several_images",)),
    # 2 SGD steps, not 3: the ulp-level differences of each step grow about 3-4x a step here
    # (gradients 5.6e-8, 1.5e-7, then 6.2e-7 in a third step, too close to the tolerance).
    Case("gemma3", "1F1B", tied=True, sgd_steps=2, claims=("several_images",)),
    Case("paligemma", "1F1B", batch="prefix", claims=("several_images",)),
    Case("paligemma", "ZBVZeroBubble", batch="prefix", claims=("several_images",)),
    Case("qwen3_vl", "1F1B", claims=("text_only_mb",)),
    Case("qwen3_vl", "Interleaved1F1B", claims=("text_only_mb",)),
    Case("qwen3_vl", "ZBVZeroBubble", seed=7, claims=("text_only_mb",)),
    Case("qwen3_vl", "1F1B", batch="videos"),
    Case("qwen3_vl", "Interleaved1F1B", batch="videos", seed=3, claims=("video_only_mb",)),
    Case("idefics3", "1F1B", claims=("text_only_mb",)),
    Case("idefics3", "Interleaved1F1B", seed=7, claims=("text_only_mb",)),
    Case("smolvlm", "1F1B", claims=("text_only_mb",)),
    Case("internvl", "1F1B"),
    Case("internvl", "GPipe", seed=2),
    Case("qwen3_vl", "1F1B", tied=True, sgd_steps=2),
    Case("qwen3_5", "1F1B"),
    Case("qwen3_5", "Interleaved1F1B", seed=7),
    Case("qwen3_5", "1F1B", batch="videos", claims=("image_and_video_in_a_sample",)),
    Case("kimi_k25", "1F1B"),
    Case("kimi_k25", "1F1B", batch="videos", claims=("image_and_video_in_a_sample",)),
    Case("step3p7", "1F1B"),
    Case("step3p7", "GPipe", seed=3),
    Case("llava_next", "1F1B", claims=("text_only_mb",)),
    Case("llava_onevision", "1F1B", seed=12, claims=("image_beside_several",)),
    Case(
        "llava_onevision",
        "Interleaved1F1B",
        seed=9,
        claims=("text_only_mb", "image_beside_several"),
    ),
    Case(
        "llava_onevision",
        "1F1B",
        batch="videos",
        seed=9,
        claims=("text_only_mb", "image_beside_several", "image_and_video_in_a_sample"),
    ),
    # --- qwen3_vl_moe ---
    # Router loss off (the config's default): the unsplit model's loss. On: the formula per
    # microbatch; with stage 0 holding no decoder layer (its stats start from zeros and pass on
    # as a copy) under Interleaved1F1B; with one microbatch, exactly model(**batch).loss.
    Case("qwen3_vl_moe", "1F1B", claims=("text_only_mb",)),
    Case("qwen3_vl_moe", "1F1B", aux="config", api_checks=True, claims=("text_only_mb",)),
    Case(
        "qwen3_vl_moe", "Interleaved1F1B", aux="override", tied=True, layers_per_stage=(0, 2, 1, 1)
    ),
    Case("qwen3_vl_moe", "GPipe", aux="config", microbatches=1),
    # --- ernie4_5_vl_moe ---
    # Tied embeddings (its default) across the ranks through 2 SGD steps; the pipeline derives
    # both token-type fields; Interleaved1F1B puts the dense layer 0 alone on stage 0.
    Case("ernie4_5_vl_moe", "1F1B", tied=True, sgd_steps=2, claims=("text_only_mb",)),
    Case(
        "ernie4_5_vl_moe",
        "Interleaved1F1B",
        drop_mm_token_type_ids=True,
        claims=("text_only_mb",),
    ),
    # Router loss on: per microbatch; stage 0 holds only the dense layer 0 (its stats pass on
    # as a copy) and the text-only microbatch routes every token to the text experts.
    Case("ernie4_5_vl_moe", "Interleaved1F1B", aux="config", claims=("text_only_mb",)),
    # Videos (frame pairs merged by the resampler) beside images, through the video experts.
    Case(
        "ernie4_5_vl_moe",
        "1F1B",
        aux="config",
        batch="videos",
        seed=2,
        claims=("image_and_video_in_a_sample",),
    ),
    # --- llama4 ---
    # The reference is the fixture's reference_loss (the unsplit forward fails upstream). Images
    # of one tile and of 2x1, 1x2 and 2x2 grids plus a global tile (seed 1: 5, 5 and 5 tiles in
    # sample 1, 1, 3 and 3 in sample 4); 1F1B and ZBVZeroBubble on the processor's own output
    # (no aspect_ratios: each image's tiles come from its tokens), Interleaved1F1B with
    # aspect_ratios kept.
    *(
        Case(
            "llama4",
            schedule,
            without=("aspect_ratios",),
            claims=("text_only_mb", "several_images", "several_tiles"),
        )
        for schedule in ("1F1B", "ZBVZeroBubble")
    ),
    Case("llama4", "Interleaved1F1B", claims=("text_only_mb", "several_images", "several_tiles")),
    # --- gemma4 ---
    # 4 layers, sliding/full alternating; layers 0 and 1 store the keys and values that layers
    # 2 and 3 reuse. 2 stages (layers 0-1, 2-3): both types' keys and values and the per-layer
    # inputs of layers 2-3 cross, tied embeddings as in the checkpoints; the same split with
    # the MoE block on; 4 stages of one layer on 2 ranks, built from a save_pretrained
    # directory (each rank loads its stages' tensors only): the sliding keys and values pass
    # through stage 1 and per-layer inputs through stages 1 and 2 on their way.
    Case("gemma4", "1F1B", tied=True, claims=("several_images", "kv_crosses_stages")),
    Case("gemma4", "1F1B", variant="moe", claims=("kv_crosses_stages",)),
    Case(
        "gemma4",
        "Interleaved1F1B",
        layers_per_stage=(1, 1, 1, 1),
        checkpoint=True,
        claims=("text_only_mb", "kv_crosses_stages"),
    ),
    # Videos (one row per frame, video_position_ids following the frame rows): seed 10 gives
    # sample 1 images and a video of 2 frames, sample 4 a video of 3 frames alone in its
    # microbatch; seed 3, on 4 stages of one layer, microbatches of a video only, of images
    # only, of a video only and of text only.
    Case(
        "gemma4",
        "1F1B",
        batch="videos",
        seed=10,
        claims=("video_only_mb", "image_and_video_in_a_sample", "kv_crosses_stages"),
    ),
    Case(
        "gemma4",
        "Interleaved1F1B",
        batch="videos",
        seed=3,
        layers_per_stage=(1, 1, 1, 1),
        claims=("video_only_mb", "text_only_mb", "kv_crosses_stages"),
    ),
    # --- aria ---
    # The projector's LayerNorm divides by the small spread of the random cross-attention output:
    # gradients up to 9.6 (cross_attn.linear.bias), whose fp32 ulp is 9.5e-7, so summation order
    # alone leaves about 2e-6 there; 4e-6 is 4 ulps of the largest gradient.
    Case("aria", "1F1B", claims=("several_images", "text_only_mb"), grad_tolerance=4e-6),
    # --- inkling_mm_model ---
    Case("inkling_mm_model", "Interleaved1F1B", claims=("several_images", "text_only_mb")),
    # --- qwen3_5_moe ---
    # Each MoE family: router loss off on 1F1B and Interleaved1F1B (model(**batch).loss), and on
    # (the formula per microbatch) on one of them.
    Case("qwen3_5_moe", "1F1B", claims=("text_only_mb",)),
    Case("qwen3_5_moe", "Interleaved1F1B", batch="videos", claims=("image_and_video_in_a_sample",)),
    Case("qwen3_5_moe", "Interleaved1F1B", aux="config", claims=("text_only_mb",)),
    # --- glm4v_moe --- (images only, as GLM-4V)
    # Aux on, Interleaved1F1B: stage 0 holds only the dense layer 0 (no router), routing uses
    # random sigmoid biases while the loss counts the raw logits' softmax.
    Case("glm4v_moe", "1F1B", claims=("several_images",)),
    Case("glm4v_moe", "Interleaved1F1B", claims=("several_images", "text_only_mb")),
    Case("glm4v_moe", "Interleaved1F1B", aux="override", claims=("several_images",)),
    # --- minimax_m3_vl ---
    Case("minimax_m3_vl", "1F1B", batch="videos", claims=("image_and_video_in_a_sample",)),
    Case("minimax_m3_vl", "Interleaved1F1B", claims=("text_only_mb",)),
    Case("minimax_m3_vl", "1F1B", aux="config", claims=("text_only_mb",)),
    # --- qwen3_omni_moe_thinker ---
    Case("qwen3_omni_moe_thinker", "1F1B", batch="videos", claims=("image_and_video_in_a_sample",)),
    Case("qwen3_omni_moe_thinker", "Interleaved1F1B", claims=("text_only_mb",)),
    Case("qwen3_omni_moe_thinker", "Interleaved1F1B", aux="config", batch="videos"),
)


# --- batches ---------------------------------------------------------------------------


def one_image_per_sample_batch(config: Any, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA batch with exactly one image per sample: ``pixel_values [B, C, H, W]``, built
    with the real image processor (``synthetic_batch`` always makes sample 0 text-only)."""
    from PIL import Image

    from pp_media.testing import image_processor

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
    suffix, which alone carries labels."""
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
    from pp_media.testing import default_seq_len, synthetic_batch

    if case.batch == "one_image":
        return one_image_per_sample_batch(config, seed)
    videos = case.batch == "videos"
    max_images = 0 if case.batch == "text_only" else 3
    seq_len = default_seq_len(config, videos=videos)
    batch = synthetic_batch(
        config, BATCH_SIZE, seq_len, seed=seed, max_images=max_images, videos=videos
    )
    if case.batch == "prefix":
        batch = with_prompt_prefix(batch, config)
    if case.drop_token_type_ids:
        del batch["token_type_ids"]
    for name in case.without:
        del batch[name]
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


def llama4_image_placeholders(input_ids: torch.Tensor, config: Any) -> list[list[int]]:
    """Per sample, the placeholders of each image between its start and end tokens, read
    token by token (the test's own reading, beside the pipeline's vectorised one)."""
    per_sample = []
    for row in input_ids.tolist():
        images, count = [], None
        for token in row:
            if token == config.boi_token_index:
                count = 0
            elif token == config.eoi_token_index:
                images.append(count)
                count = None
            elif token == config.image_token_index and count is not None:
                count += 1
        per_sample.append(images)
    return per_sample


def describe_batch(batch: dict[str, torch.Tensor], config: Any, case: Case) -> dict[str, Any]:
    """The facts about ``batch`` that the test checks the case's claims against."""
    from pp_media._core.bounds import sample_bounds

    input_ids = batch["input_ids"]
    info: dict[str, Any] = {
        "keys": sorted(batch),
        "bounds": list(sample_bounds(input_ids.shape[0], case.microbatches)),
        "shapes": {name: list(value.shape) for name, value in batch.items()},
        "image_tokens": (input_ids == config.image_token_id).sum(1).tolist(),
        "image_runs": placeholder_runs(input_ids, config.image_token_id),
        "video_tokens": [0] * input_ids.shape[0],
        "video_runs": [0] * input_ids.shape[0],
    }
    video_token = getattr(config, "video_token_id", None)
    if video_token is not None:
        info["video_tokens"] = (input_ids == video_token).sum(1).tolist()
        info["video_runs"] = placeholder_runs(input_ids, video_token)
    for name in (
        "image_grid_thw",
        "video_grid_thw",
        "num_patches",
        "num_local_patches",
        "image_sizes",
        "aspect_ratios",
        "token_type_ids",
        "moe_mm_token_type_ids",
        "num_frames_per_video",
    ):
        if name in batch:
            info[name] = batch[name].tolist()
    for name in ("image_position_ids", "video_position_ids"):  # Gemma4: real patches per row
        if name in batch:
            info[f"real_{name}"] = (batch[name] != -1).all(-1).sum(-1).tolist()
    if "mm_token_type_ids" in batch:
        info["mm_token_types"] = batch["mm_token_type_ids"].sum(1).tolist()
    if config.model_type == "llama4":  # an image's tiles are several runs: count its starts
        info["image_runs"] = (input_ids == config.boi_token_index).sum(1).tolist()
        info["image_placeholders"] = llama4_image_placeholders(input_ids, config)
    image_bos = getattr(config, "image_bos_token_id", None)
    if image_bos is not None:  # Inkling: one image_bos before each placeholder run
        info["image_bos"] = (input_ids == image_bos).sum(1).tolist()
    if "pixel_mask" in batch:  # Aria: the share of each row's pixels that are the image's
        info["pixel_mask_real"] = batch["pixel_mask"].flatten(1).float().mean(1).tolist()
    if "pixel_attention_mask" in batch:  # per-sample rows: real crops, all-zero padding rows
        pixels = batch["pixel_values"]
        info["real_crops"] = (~(pixels == 0).flatten(2).all(-1)).sum(1).tolist()
        info["zero_rows"] = [bool((row == 0).all()) for row in pixels]
    return info


# --- what the stages hold and receive ------------------------------------------------------


def stage_layer_types(stage: Any) -> dict[str, list[Any]]:
    """The layer types of one stage's text model: ``view``, its own (cut) config's
    ``layer_types``; ``modules``, each held decoder layer's ``block_type`` (Qwen3.5: which
    token mixer it was built with; None for families without one)."""
    text = stage.get_submodule(stage.adapter.text_model_path)
    return {
        "view": list(getattr(text.config, "layer_types", None) or []),
        "modules": [getattr(layer, "block_type", None) for layer in text.layers],
    }


def stage_layer_kinds(stage: Any) -> dict[str, list[Any]]:
    """Llama4: whether each decoder layer the stage holds applies RoPE (``use_rope``) and has
    experts (``is_moe_layer``), both fixed at construction (None for other families)."""
    layers = stage.get_submodule(stage.adapter.text_model_path).layers
    return {
        "rope": [getattr(getattr(layer, "self_attn", None), "use_rope", None) for layer in layers],
        "moe": [getattr(layer, "is_moe_layer", None) for layer in layers],
    }


class Received:
    """Forward pre-hooks on this rank's stage modules: per stage, per microbatch, how many
    positional tensors it got, and the largest of each carried per-layer feature (the
    ``deepstack.<i>`` carries, by the stage's schema, for stages after the first)."""

    def __init__(self, pipe: Any) -> None:
        self.calls: dict[int, list[dict[str, Any]]] = {}
        self.handles = [
            stage.register_forward_pre_hook(self._hook(stage), with_kwargs=True)
            for stage in pipe.stages
        ]

    def _hook(self, stage: Any) -> Any:
        from pp_media._hf.carry import live

        names = [carry.name for carry in live(stage.schema, stage.first_layer)]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            received = zip(names, args[1:], strict=False) if not stage.is_first else ()
            carried = [value for name, value in received if name.startswith("deepstack.")]
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


# --- what the reference shows to matter ------------------------------------------------------


def tied_copies(pipe: Any) -> dict[str, Any]:
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


def mask_effect(
    reference: Any,
    batch: dict[str, torch.Tensor],
    ref_loss: float,
    ref_grads: dict[str, Any],
    field: str = "token_type_ids",
) -> dict[str, float]:
    """How far the unsplit model's loss and gradients move when ``field`` is left out:
    ``token_type_ids``, plain causal masks (what a pipeline that lost the bidirectional masks
    would be off by); ernie's ``moe_mm_token_type_ids``, every token through the text experts.
    ``autograd.grad`` leaves the reference's ``.grad`` alone."""
    from pp_media.testing import reference_loss

    params = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    causal = {name: value for name, value in batch.items() if name != field}
    loss = reference_loss(reference, causal)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grad = 0.0
    for name, value in zip(params, grads, strict=True):
        ref = ref_grads[name]
        if value is not None and ref is not None:
            grad = max(grad, (value - ref).abs().max().item())
    return {"loss": abs(loss.item() - ref_loss), "grad": grad}


def router_facts(
    reference: Any, batch: dict[str, torch.Tensor], router: Any, ref_grads: dict[str, Any]
) -> dict[str, Any]:
    """What shows a router-loss case's check can fail: the reference's loss without the router
    loss and with it over the whole batch (``model(**batch).loss``, config flag off and on),
    how far the router gradients move without it, and the per-microbatch and whole-batch
    ``aux``. ``autograd.grad`` leaves the reference's ``.grad`` alone."""
    text = reference.config.get_text_config()
    flag = text.output_router_logits
    params = dict(reference.named_parameters())
    # Router weights: ``mlp.gate`` (Qwen), ``mlp.text_moe.gate`` / ``mlp.vision_moe.gate`` (ERNIE).
    gates = [name for name in params if name.endswith(".gate.weight")]
    try:
        text.output_router_logits = False
        off = reference(**batch).loss
        grads = torch.autograd.grad(off, [params[name] for name in gates])
        text.output_router_logits = True
        with torch.no_grad():
            whole = reference(**batch).loss.item()
    finally:
        text.output_router_logits = flag
    moved = max((g - ref_grads[n]).abs().max().item() for n, g in zip(gates, grads, strict=True))
    return {
        "loss": router.loss.item(),
        "off_loss": off.item(),
        "whole_batch_loss": whole,
        "gate_grad_effect": moved,
        "mean_aux": router.mean_aux,
        "whole_batch_aux": router.whole_batch_aux,
    }


def api_checks(
    pipe: Any,
    reference: Any,
    batch: dict[str, torch.Tensor],
    ref_grads: dict[str, Any],
    case: Case,
) -> dict[str, Any]:
    """``clip_grad_norm_`` (a max norm no gradient reaches: the norm only) and ``eval_step``
    after the step, beside the reference's gradient norm and its loss in eval mode without
    a graph (per microbatch with the router loss on)."""
    norm = pipe.clip_grad_norm_(1e9).item()
    ref_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values() if g is not None])
    ).item()
    loss = pipe.eval_step(batch)
    router = pipe.last_router_loss
    reference.eval()
    with torch.no_grad():
        if case.aux:
            ref_loss = per_microbatch_router_loss(reference, batch, case.microbatches).loss
        else:
            ref_loss = reference(**batch).loss
    reference.train()
    return {
        "grad_norm": norm,
        "ref_grad_norm": ref_norm,
        "eval_loss": None if loss is None else loss.item(),
        "ref_eval_loss": ref_loss.item(),
        "eval_router_loss": None if router is None else router.item(),
    }


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


def pixel_mask_effect(reference: Any, batch: dict[str, torch.Tensor], ref_loss: float) -> float:
    """How far the unsplit model's loss moves without ``pixel_mask`` (Aria: the vision tower
    and the projector then attend to the processor's padding too): what a pipeline that lost
    the masks, or paired them with other rows' pixels, would be near."""
    unmasked = {name: value for name, value in batch.items() if name != "pixel_mask"}
    with torch.no_grad():
        return abs(reference(**unmasked).loss.item() - ref_loss)


# --- one case ----------------------------------------------------------------------------


def new_model(config: Any) -> Any:
    """The case's random model, with the family fixture's ``make_checkable`` applied."""
    from pp_media._hf.checkpoint import _model_factory
    from pp_media.testing import fixture_for

    model = _model_factory(config)(config)
    fixture_for(config.model_type).make_checkable(model, MODEL_SEED)
    return model


def build(rank: int, case: Case, config: Any, workdir: str) -> tuple[Any, Any]:
    """The reference model and the pipeline's source (a model, or a checkpoint directory)."""
    import transformers

    torch.manual_seed(MODEL_SEED)
    if case.checkpoint:
        path = Path(workdir, case.key.replace("/", "_"))
        if rank == 0:
            new_model(config).save_pretrained(path)
        dist.barrier()
        reference = transformers.AutoModelForImageTextToText.from_pretrained(path)
        reference.train()
        return reference, str(path)
    source = new_model(config)
    source.train()
    reference = copy.deepcopy(source)
    reference.train()
    return reference, source


def describe_pipe(pipe: Any, reference: Any, config: Any) -> dict[str, Any]:
    """What this rank holds: stages, their layers and layer types, parameter names."""
    full = dict(reference.named_parameters(remove_duplicate=False))
    named = dict(pipe.named_parameters(remove_duplicate=False))
    return {
        "stages": [stage.stage_index for stage in pipe.stages],
        "stage_layers": {str(s.stage_index): list(s.layer_indices) for s in pipe.stages},
        "first_layers": {str(s.stage_index): s.first_layer for s in pipe.stages},
        "stage_layer_types": {str(s.stage_index): stage_layer_types(s) for s in pipe.stages},
        "stage_layer_kinds": {str(s.stage_index): stage_layer_kinds(s) for s in pipe.stages},
        "layer_types": getattr(config.get_text_config(), "layer_types", None),
        "no_rope_layers": getattr(config.get_text_config(), "no_rope_layers", None),
        "moe_layers": getattr(config.get_text_config(), "moe_layers", None),
        "kv_sharing_modes": getattr(config.get_text_config(), "kv_sharing_modes", None),
        "n_layers": config.get_text_config().num_hidden_layers,
        "has_first_stage": pipe.has_first_stage,
        "has_last_stage": pipe.has_last_stage,
        "names": sorted(named),
        "full_names": sorted(full),
        "local_numel": sum(p.numel() for p in pipe.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
        "tied_active": pipe.tied.active,
        "reference_tied": reference.get_output_embeddings().weight
        is reference.get_input_embeddings().weight,
    }


def run_case(rank: int, case: Case, workdir: str) -> dict[str, Any]:
    """Build, step and compare; the per-rank result of ``case``."""
    from pp_media._hf.families import adapter_for
    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import reference_loss, tiny_config

    config = tiny_config(case.model_type, num_layers=case.num_layers, tie_word_embeddings=case.tied)
    if case.aux == "config":
        config.get_text_config().output_router_logits = True
    for name, value in VARIANTS.get(case.variant, {}).items():
        setattr(config.get_text_config(), name, value)
    adapter = adapter_for(config)
    reference, source = build(rank, case, config, workdir)
    pipe = build_vlm_pipeline(
        source,
        schedule=case.schedule,
        n_microbatches=case.microbatches,
        layers_per_stage=case.layers_per_stage,
        device="cpu",
        output_router_logits=True if case.aux == "override" else None,
    )
    full = dict(reference.named_parameters(remove_duplicate=False))
    named = dict(pipe.named_parameters(remove_duplicate=False))
    # The vision encoder alone (``tower``: the first vision path; Gemma3's zero-initialised
    # projector weight gets gradients even while every encoder gradient is zero), and every
    # vision part.
    tower = [name for name in full if name.startswith(adapter.vision_paths[0] + ".")]
    vision = [
        name
        for name in full
        if any(name == path or name.startswith(path + ".") for path in adapter.vision_paths)
    ]
    # Deepstack mergers: Qwen3-VL's ``deepstack_merger_list``, the Omni thinker's ``merger_list``.
    deepstack = [
        name
        for name in vision
        if ".deepstack_merger_list." in name or ".visual.merger_list." in name
    ]
    result: dict[str, Any] = {
        "case": asdict(case),
        **describe_pipe(pipe, reference, config),
        "layer_feature_count": adapter.layer_feature_count(config),
        "vision_names": vision,
        "deepstack_names": deepstack,
        "steps": [],
    }
    if case.sgd_steps:
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=SGD_LR)
        optimizer = torch.optim.SGD(pipe.parameters(), lr=SGD_LR)
    for step in range(max(case.sgd_steps, 1)):
        batch = make_batch(config, case, case.seed + step)
        if step == 0:
            result["batch"] = describe_batch(batch, config, case)
        if case.aux:
            router = per_microbatch_router_loss(reference, batch, case.microbatches)
            ref_loss = router.loss
        else:
            # Llama4's forward fails upstream: its fixture's reference_loss computes the same
            # loss from the model's parts (pp_media/testing/families/llama4.py).
            ref_loss = reference_loss(reference, batch)
        ref_loss.backward()
        ref_grads = {name: p.grad for name, p in full.items()}
        if step == 0 and case.aux:
            result["router"] = router_facts(reference, batch, router, ref_grads)
        if step == 0 and "token_type_ids" in batch:
            result["mask_effect"] = mask_effect(reference, batch, ref_loss.item(), ref_grads)
        if step == 0 and "moe_mm_token_type_ids" in batch and not case.aux:
            result["moe_effect"] = mask_effect(
                reference, batch, ref_loss.item(), ref_grads, field="moe_mm_token_type_ids"
            )
        if step == 0 and "pixel_mask" in batch:
            result["pixel_mask_effect"] = pixel_mask_effect(reference, batch, ref_loss.item())
        if step == 0 and adapter.layer_feature_count(config):
            result["deepstack_off_loss"] = deepstack_off_loss(reference, batch)

        pipe_batch = dict(batch)
        if case.drop_mm_token_type_ids:
            del pipe_batch["mm_token_type_ids"]
            pipe_batch.pop("moe_mm_token_type_ids", None)
        if case.misroute:
            pipe_batch = misrouted(pipe_batch, config)
        before = snapshot(pipe_batch)
        received = Received(pipe)
        loss = pipe.step(pipe_batch)
        record = compare_step(named, ref_grads, loss, ref_loss)
        record["received"] = received.remove()
        if case.aux:
            last = pipe.last_router_loss
            record["router_loss"] = None if last is None else last.item()
        if case.api_checks:
            record.update(api_checks(pipe, reference, batch, ref_grads, case))
        record["batch_unchanged"] = unchanged(pipe_batch, before)
        record["compared"] = len(named)
        # No gradient where the reference has one, even an all-zero one.
        record["grad_none"] = [
            name for name, p in named.items() if p.grad is None and ref_grads[name] is not None
        ]
        record["ref_tower_grad"] = largest(ref_grads[name] for name in tower)
        record["ref_vision_grad"] = largest(ref_grads[name] for name in vision)
        record["vision_grad"] = largest(named[n].grad for n in vision if n in named)
        record["ref_deepstack_grad"] = largest(ref_grads[name] for name in deepstack)
        record["deepstack_grad"] = largest(named[n].grad for n in deepstack if n in named)
        if case.sgd_steps:
            record.update(step_both_and_compare(ref_optimizer, optimizer, named, full))
        if case.tied:
            record.update(tied_copies(pipe))
        result["steps"].append(record)
    return result


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every case, in order."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, rank, case, out_dir)) for case in CASES)
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)


#: Cases on 3 ranks (3 pipeline stages, one per rank): Gemma4 with layers 0 / 1-2 / 3, so the
#: per-layer inputs of layers 1-3 leave stage 0, both layer types' keys and values cross the
#: first boundary and the sliding type's (stored by layer 0, reused by layer 2) crosses only it,
#: while the full type's (stored by layer 1, reused by layer 3) crosses the second too.
THREE_RANK_CASES = [
    Case("gemma4", "1F1B", layers_per_stage=(1, 2, 1), claims=("kv_crosses_stages",)),
]
THREE_RANKS = 3


def worker_three_ranks(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank of the 3-rank run."""
    quiet_transformers()
    runs = ((case.key, partial(run_case, rank, case, out_dir)) for case in THREE_RANK_CASES)
    run_cases_on_rank(rank, port, out_dir, runs, world_size=THREE_RANKS)
