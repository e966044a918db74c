"""Benchmark: the even stage split vs ``layers_per_stage="auto"`` vs the best split measured.

Run from the repository root::

    python benchmarks/bench_stage_split.py           # a few minutes on 2 CPU cores
    python benchmarks/bench_stage_split.py --quick   # fewer rounds, for a smoke run

1. The arithmetic from a real checkpoint's configs. Qwen2.5-VL-7B, -32B and -72B (numbers from
   their ``config.json`` on the Hugging Face Hub, ``Qwen/Qwen2.5-VL-{7B,32B,72B}-Instruct``,
   written in below from public knowledge, not fetched): vision tower depth 32, hidden 1280,
   SwiGLU intermediate 3420 (7B) / 3456 (32B, 72B), 16 heads, patch 14, temporal patch 2,
   spatial merge 2, windows of 112 px (8x8 patches) except the 4 full-attention blocks 7, 15,
   23, 31; text 7B: hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 KV heads;
   32B: 5120, 27648, 64 layers, 40 / 8; 72B: 8192, 29568, 80 layers, 64 / 8; vocabulary
   152064. Forward FLOPs are 2 per multiply-add of every weight matrix plus attention's
   4 x (sequence or window) x width per token and layer; forward+backward is 3x that. The
   workloads: ``image_heavy`` samples of 576 tokens holding two 448x448 images (1024 patches,
   256 placeholders each); ``mixed``: every other sample text-only, the rest one such image.
2. The measured run: 2 gloo ranks x 1 thread, a Qwen2-VL-shaped model scaled down (text width
   64, 28 decoder layers as in the 7B) whose vision tower (depth and width) and vocabulary are
   chosen so that its FLOPs per vision patch and per LM-head token, relative to one decoder
   layer per token, equal the 7B's (within 1%); the workloads scaled by 1/16 (36 tokens, 64
   patches per image), keeping patches per token. 1F1B, 4 microbatches of one sample. For each
   workload it builds the pipeline of every layer-granular 2-stage split (stage 0 holding 0..28
   decoder layers), asks ``"auto"`` for its split (costs measured by rank 0 on the workload's
   batch), then times whole steps, interleaved: every round steps every split once, in alternating
   order, and each split's median over the rounds is its step time.
3. The model of 4 and 8 stages for the three real shapes: the slowest stage's cost under the
   even split (``balanced_layers``), the automatic one (the same search as ``"auto"``, on the
   FLOP costs of step 1) and the ideal bound, total work / stages.

The last line: ``auto vs even: X.XXx, auto vs best: Y.YY`` (image-heavy, 1F1B, the CPU-time
steps): even's step time over auto's, and auto's over the best split's. The script reports, it
does not judge: the exit code is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_media._hf.auto_split import StageCosts, auto_layers_per_stage, estimate
from pp_media._hf.partition import balanced_layers

WORLD_SIZE = 2
MICROBATCHES = 4
BATCH = 4
#: Real workloads: tokens per sample, and the patches of one 448x448 image.
REAL_TOKENS = 576
REAL_IMAGE = (1, 32, 32)
#: The measured run's workloads, 1/16 of the real ones: 36 tokens, 64-patch images.
SCALE = 16
SCALED_IMAGE = (1, 8, 8)


# --- 1. the real configs -------------------------------------------------------------------


@dataclass(frozen=True)
class Vision:
    depth: int
    hidden: int
    #: Width of the MLP's hidden layer.
    intermediate: int
    #: Weight matrices of the MLP: 3 for SwiGLU (Qwen2.5-VL), 2 for fc1/fc2 (Qwen2-VL).
    mlp_matrices: int
    #: Patches per attention window in windowed blocks; None: every block attends the image.
    window: int | None
    full_blocks: int
    out_hidden: int
    patch_input: int = 3 * 2 * 14 * 14
    merge: int = 2


@dataclass(frozen=True)
class Text:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _qwen25_vision(intermediate: int, out_hidden: int) -> Vision:
    return Vision(32, 1280, intermediate, 3, 64, 4, out_hidden)


#: Qwen2.5-VL-{7B,32B,72B}-Instruct ``config.json`` (see the module docstring).
QWEN25_VL = {
    "7B": (_qwen25_vision(3420, 3584), Text(3584, 18944, 28, 28, 4, 152064)),
    "32B": (_qwen25_vision(3456, 5120), Text(5120, 27648, 64, 40, 8, 152064)),
    "72B": (_qwen25_vision(3456, 8192), Text(8192, 29568, 80, 64, 8, 152064)),
}


def vision_flops(vision: Vision, patches: int) -> float:
    """Forward FLOPs of one image of ``patches`` patches through the tower and the merger."""
    block = 4 * vision.hidden**2 + vision.mlp_matrices * vision.hidden * vision.intermediate
    windowed = vision.depth - vision.full_blocks if vision.window is not None else 0
    window = min(vision.window or patches, patches)
    attention = 4 * vision.hidden * (windowed * window + (vision.depth - windowed) * patches)
    merged = vision.hidden * vision.merge**2
    merger = merged * merged + merged * vision.out_hidden
    per_patch = vision.patch_input * vision.hidden + vision.depth * block
    return 2 * patches * per_patch + patches * attention + 2 * (patches / vision.merge**2) * merger


def layer_flops(text: Text, tokens: int) -> float:
    """Forward FLOPs of one decoder layer per token of a ``tokens``-long sequence."""
    kv = text.kv_heads * text.head_dim
    weights = 2 * text.hidden**2 + 2 * text.hidden * kv + 3 * text.hidden * text.intermediate
    return 2 * weights + 4 * tokens * text.hidden


def head_flops(text: Text) -> float:
    """Forward FLOPs of the LM head per token."""
    return 2 * text.hidden * text.vocab


@dataclass(frozen=True)
class Workload:
    name: str
    #: Per sample, the patches of each of its images.
    images: tuple[tuple[int, ...], ...]
    tokens: int


def workloads(image: tuple[int, int, int], tokens: int) -> dict[str, Workload]:
    patches = image[0] * image[1] * image[2]
    heavy = tuple((patches, patches) for _ in range(BATCH))
    mixed = tuple((patches,) if i % 2 == 0 else () for i in range(BATCH))
    return {
        "image_heavy": Workload("image_heavy", heavy, tokens),
        "mixed": Workload("mixed", mixed, tokens),
    }


def part_costs(vision: Vision, text: Text, workload: Workload) -> StageCosts:
    """Forward+backward FLOPs per step of stage 0's own part, one layer and the head."""
    tokens = len(workload.images) * workload.tokens
    first = sum(vision_flops(vision, p) for sample in workload.images for p in sample)
    return StageCosts(
        first=3 * first,
        layer=3 * tokens * layer_flops(text, workload.tokens),
        last=3 * tokens * head_flops(text),
        unit="flop",
        source="configs",
    )


def split_costs(costs: StageCosts, n_layers: int, n_stages: int) -> dict[str, Any]:
    """Even and automatic splits of ``n_layers`` over ``n_stages`` single-stage ranks: their
    layers and slowest stage, and the ideal bound (total work / stages)."""
    even = tuple(balanced_layers(n_layers, n_stages))
    auto = auto_layers_per_stage(costs, n_layers, n_stages, lambda s: s, n_stages)
    even_cost = estimate(costs, even, lambda s: s, n_stages)
    auto_cost = estimate(costs, auto, lambda s: s, n_stages)
    return {
        "even_step": one_f_one_b_time(list(even_cost.stages), MICROBATCHES),
        "auto_step": one_f_one_b_time(list(auto_cost.stages), MICROBATCHES),
        "even": even,
        "auto": auto,
        "even_cost": even_cost.bottleneck,
        "auto_cost": auto_cost.bottleneck,
        "ideal": auto_cost.ideal,
    }


def one_f_one_b_time(stage_costs: list[float], microbatches: int) -> float:
    """A 1F1B step's length in the usual model: the fill and drain take every stage's
    per-microbatch time once, the steady state the slowest stage's for the other M - 1."""
    per_mb = [cost / microbatches for cost in stage_costs]
    return sum(per_mb) + (microbatches - 1) * max(per_mb)


# --- 2. the scaled model -------------------------------------------------------------------

TEXT_WIDTH = 64


def scaled_shapes(real_vision: Vision, real_text: Text) -> tuple[Vision, Text]:
    """The measured model's shapes: text width 96 with the real MLP ratio and layer count, and
    the vocabulary solved (it enters linearly) so that head FLOPs per token over one decoder
    layer's equal the real model's; a Qwen2-VL vision tower (full attention) whose depth, width
    (a multiple of 8) and MLP ratio (1..4) come closest to the real vision FLOPs per patch over
    one decoder layer's per token, at the same patches per token."""
    real_patches = REAL_IMAGE[0] * REAL_IMAGE[1] * REAL_IMAGE[2]
    patches = SCALED_IMAGE[0] * SCALED_IMAGE[1] * SCALED_IMAGE[2]
    real_layer = layer_flops(real_text, REAL_TOKENS)
    vision_ratio = vision_flops(real_vision, real_patches) / real_patches / real_layer
    head_ratio = head_flops(real_text) / real_layer
    intermediate = round(TEXT_WIDTH * real_text.intermediate / real_text.hidden)
    layer = layer_flops(Text(TEXT_WIDTH, intermediate, 1, 4, 2, 0), REAL_TOKENS // SCALE)
    vocab = round(head_ratio * layer / (2 * TEXT_WIDTH))
    text = Text(TEXT_WIDTH, intermediate, real_text.layers, 4, 2, vocab)

    def shape(depth: int, width: int, ratio: int) -> Vision:
        return Vision(depth, width, ratio * width, 2, None, depth, TEXT_WIDTH)

    candidates = [
        shape(depth, width, ratio)
        for depth in range(1, 9)
        for width in range(16, 257, 8)
        for ratio in (1, 2, 3, 4)
    ]
    vision = min(
        candidates,
        key=lambda v: abs(vision_flops(v, patches) / patches / layer / vision_ratio - 1),
    )
    return vision, text


def scaled_config(vision: Vision, text: Text) -> Any:
    import transformers

    from pp_media.testing import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

    half = text.head_dim // 2
    sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return transformers.Qwen2VLConfig(
        text_config={
            "hidden_size": text.hidden,
            "intermediate_size": text.intermediate,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "num_key_value_heads": text.kv_heads,
            "vocab_size": max(text.vocab, VISION_END + 1),
            "rope_scaling": {"type": "mrope", "mrope_section": sections},
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "depth": vision.depth,
            "embed_dim": vision.hidden,
            "hidden_size": text.hidden,
            "mlp_ratio": vision.intermediate // vision.hidden,
            "num_heads": vision.hidden // 8,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def make_batch(config: Any, workload: Workload, seed: int = 0) -> dict[str, torch.Tensor]:
    """The workload's collated batch: each image a placeholder run between vision start/end
    tokens, then text; labels on the text tokens."""
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    grid = torch.tensor(SCALED_IMAGE)
    tokens_per_image = int(grid.prod()) // merge**2
    rows, grids = [], []
    for sample in workload.images:
        row: list[int] = []
        for _ in sample:
            row += [config.vision_start_token_id]
            row += [config.image_token_id] * tokens_per_image
            row += [config.vision_end_token_id]
            grids.append(grid)
        text = workload.tokens - len(row)
        row += torch.randint(10, 900, (text,), generator=generator).tolist()
        rows.append(row)
    input_ids = torch.tensor(rows)
    labels = input_ids.masked_fill(input_ids >= config.image_token_id, -100)
    patches = int(sum(g.prod() for g in grids))
    row_width = 3 * 2 * 14 * 14
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(patches, row_width, generator=generator),
        "image_grid_thw": torch.stack(grids),
    }


def timed_step(pipe: Any, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One step's wall time (between barriers) and this rank's process CPU time in it."""
    dist.barrier()
    started, cpu = time.perf_counter(), time.process_time()
    pipe.step(batch)
    cpu = time.process_time() - cpu
    dist.barrier()
    elapsed = time.perf_counter() - started
    for param in pipe.parameters():
        param.grad = None
    return elapsed, cpu


def worker(rank: int, port: int, out_dir: str, rounds: int, config: Any) -> None:
    import transformers

    from pp_media._hf.pipeline import build_vlm_pipeline

    transformers.logging.set_verbosity_error()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(minutes=10))
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.train()
    n_layers = config.text_config.num_hidden_layers
    options = {"schedule": "1F1B", "n_microbatches": MICROBATCHES, "device": "cpu"}
    results: dict[str, Any] = {}
    for name, workload in workloads(SCALED_IMAGE, REAL_TOKENS // SCALE).items():
        if rank == 0:
            print(f"   measuring {name} ...", file=sys.stderr, flush=True)
        batch = make_batch(config, workload)
        auto = build_vlm_pipeline(model, layers_per_stage="auto", sample_batch=batch, **options)
        pipes = {
            first: build_vlm_pipeline(model, layers_per_stage=(first, n_layers - first), **options)
            for first in range(n_layers + 1)
        }
        for pipe in pipes.values():  # shape inference and warm-up
            timed_step(pipe, batch)
        times: dict[str, list[float]] = {str(first): [] for first in pipes}
        cpu: dict[str, list[float]] = {str(first): [] for first in pipes}
        for round_ in range(rounds):
            for first in sorted(pipes, reverse=round_ % 2 == 1):
                wall, used = timed_step(pipes[first], batch)
                times[str(first)].append(wall)
                cpu[str(first)].append(used)
            if rank == 0:
                print(f"   round {round_ + 1} of {rounds} done", file=sys.stderr, flush=True)
        costs = auto.layout.costs
        results[name] = {
            "auto_split": list(auto.layout.layers_per_stage),
            "parts": {
                "first": costs.parts.first,
                "layer": costs.parts.layer,
                "last": costs.parts.last,
                "stage": costs.parts.stage,
            },
            "times": times,
            "cpu": cpu,
        }
    gathered: list[Any] = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, {name: result["cpu"] for name, result in results.items()})
    for name, result in results.items():
        result["cpu"] = [per_rank[name] for per_rank in gathered]
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- reports -------------------------------------------------------------------------------


def report_configs() -> dict[str, dict[str, StageCosts]]:
    """Step 1: per-part FLOPs of the real shapes and the 2-stage arithmetic."""
    print("1. Qwen2.5-VL configs, forward FLOPs (x3 for forward+backward)")
    print(
        f"   {'model':>5}  {'vision/patch':>12}  {'layer/token':>11}  {'head/token':>10}  "
        f"{'patch/layer':>11}  {'head/layer':>10}"
    )
    costs: dict[str, dict[str, StageCosts]] = {}
    for model, (vision, text) in QWEN25_VL.items():
        patches = REAL_IMAGE[0] * REAL_IMAGE[1] * REAL_IMAGE[2]
        per_patch = vision_flops(vision, patches) / patches
        layer = layer_flops(text, REAL_TOKENS)
        print(
            f"   {model:>5}  {per_patch / 1e9:>10.3f} G  {layer / 1e9:>9.3f} G  "
            f"{head_flops(text) / 1e9:>8.3f} G  {per_patch / layer:>11.2f}  "
            f"{head_flops(text) / layer:>10.2f}"
        )
        costs[model] = {
            name: part_costs(vision, text, workload)
            for name, workload in workloads(REAL_IMAGE, REAL_TOKENS).items()
        }
    print()
    print(
        "   2 stages, in decoder-layer units per step (stage 0: vision + layers; last: layers +"
        " head):"
    )
    for model in QWEN25_VL:
        for name, parts in costs[model].items():
            n_layers = QWEN25_VL[model][1].layers
            split = split_costs(parts, n_layers, 2)
            print(
                f"   {model:>4} {name:<11} vision {parts.first / parts.layer:5.2f}, head "
                f"{parts.last / parts.layer:4.2f}, layers {n_layers}: even {split['even']} -> "
                f"{split['even_cost'] / parts.layer:5.2f}, auto {split['auto']} -> "
                f"{split['auto_cost'] / parts.layer:5.2f}, ideal "
                f"{split['ideal'] / parts.layer:5.2f}: slowest stage even/auto "
                f"{split['even_cost'] / split['auto_cost']:.3f}x, 1F1B step (M={MICROBATCHES}) "
                f"{split['even_step'] / split['auto_step']:.3f}x"
            )
    print()
    return costs


def report_stage_table(costs: dict[str, dict[str, StageCosts]]) -> None:
    """Step 3: 4 and 8 stages of the real shapes, image-heavy and mixed."""
    print("3. Model: slowest stage per step (FLOP costs), even vs auto vs ideal (total / stages)")
    print(
        f"   {'model':>5} {'workload':<11} {'stages':>6}  {'even':>8}  {'auto':>8}  "
        f"{'ideal':>8}  {'even/auto':>9}  {'auto/ideal':>10}  auto layers"
    )
    for model in QWEN25_VL:
        n_layers = QWEN25_VL[model][1].layers
        for name, parts in costs[model].items():
            for n_stages in (4, 8):
                split = split_costs(parts, n_layers, n_stages)
                unit = 1e12
                print(
                    f"   {model:>5} {name:<11} {n_stages:>6}  {split['even_cost'] / unit:>6.1f} T"
                    f"  {split['auto_cost'] / unit:>6.1f} T  {split['ideal'] / unit:>6.1f} T  "
                    f"{split['even_cost'] / split['auto_cost']:>8.2f}x  "
                    f"{split['auto_cost'] / split['ideal']:>10.3f}  "
                    f"{','.join(map(str, split['auto']))}"
                )
    print()


def cpu_step(per_rank: list[float]) -> float:
    """A 1F1B step from each rank's CPU time in it (its share of the work): the fill and drain
    take every rank's per-microbatch time once, the steady state the slowest rank's M - 1
    times. Unlike wall time, CPU time does not count other processes sharing the cores."""
    return one_f_one_b_time(per_rank, MICROBATCHES)


def report_measured(results: dict[str, Any], n_layers: int) -> tuple[float, float]:
    """Step 2: the measured step times; returns image-heavy (even / auto, auto / best) of the
    CPU-time steps."""
    print(
        f"2. Measured, 2 gloo ranks x 1 thread, 1F1B, {MICROBATCHES} microbatches (medians of "
        "interleaved rounds)"
    )
    headline = (0.0, 0.0)
    even_first = balanced_layers(n_layers, 2)[0]
    for name, result in results.items():
        wall = {int(k): statistics.median(v) for k, v in result["times"].items()}
        per_rank = [
            {int(k): statistics.median(v) for k, v in rank.items()} for rank in result["cpu"]
        ]
        steps = {first: cpu_step([rank[first] for rank in per_rank]) for first in wall}
        auto_first = result["auto_split"][0]
        parts = result["parts"]
        print(
            f"   {name}: parts per step measured by 'auto' on rank 0 (CPU time): stage 0's own "
            f"{parts['first'] * 1e3:.1f} ms, layer {parts['layer'] * 1e3:.2f} ms, head "
            f"{parts['last'] * 1e3:.1f} ms, every stage {parts['stage'] * 1e3:.1f} ms "
            f"(vision = {parts['first'] / parts['layer']:.1f} layers); auto split "
            f"{auto_first},{n_layers - auto_first}"
        )
        print("   stage 0's layers: step from rank CPU times / wall-clock step (ms)")
        for row in range(0, n_layers + 1, 8):
            cells = [
                f"{first:>2}: {steps[first] * 1e3:4.0f} / {wall[first] * 1e3:4.0f}"
                for first in range(row, min(row + 8, n_layers + 1))
            ]
            print("     " + "   ".join(cells))
        lines = {}
        for label, measured in (("CPU-time step", steps), ("wall-clock step", wall)):
            best = min(measured, key=measured.get)
            even, auto = measured[even_first], measured[auto_first]
            lines[label] = (even / auto, auto / measured[best])
            print(
                f"   {label}: even {even_first},{n_layers - even_first} {even * 1e3:.0f} ms, "
                f"auto {auto * 1e3:.0f} ms, best {best},{n_layers - best} "
                f"{measured[best] * 1e3:.0f} ms: even/auto {even / auto:.2f}x, auto/best "
                f"{auto / measured[best]:.2f}"
            )
        if name == "image_heavy":
            headline = lines["CPU-time step"]
    print()
    return headline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round instead of 3")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the sweep")
    args = parser.parse_args(argv)
    costs = report_configs()
    vision, text = scaled_shapes(*QWEN25_VL["7B"])
    config = scaled_config(vision, text)
    print(
        f"   measured model: text width {text.hidden}, intermediate {text.intermediate}, "
        f"{text.layers} layers, vocabulary {text.vocab}; vision width {vision.hidden}, depth "
        f"{vision.depth}, MLP {vision.intermediate}"
    )
    print()
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            worker,
            args=(_free_port(), out_dir, rounds, config),
            nprocs=WORLD_SIZE,
            start_method="spawn",
        )
        results = json.loads(Path(out_dir, "results.json").read_text())
    even_vs_auto, auto_vs_best = report_measured(results, text.layers)
    report_stage_table(costs)
    print(f"auto vs even: {even_vs_auto:.2f}x, auto vs best: {auto_vs_best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
