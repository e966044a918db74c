"""Benchmark: pipeline step time with media-balanced microbatches, and the cost of staging.

Run from the repository root::

    python benchmarks/bench_balance.py           # about 2 minutes on 2 CPU cores
    python benchmarks/bench_balance.py --quick   # fewer repetitions, for a smoke run

Two gloo ranks on the CPU, one thread each, run a toy VLM split into pipeline stages
(``1F1B``: 2 stages; ``Interleaved1F1B``: 4 stages, 2 per rank). The vision tower (a per-patch
MLP, then one pooled token per image) sits on stage 0 with the token embeddings, so its cost
grows with the patches of the microbatch. Its width is calibrated first so that the two ranks'
work is even for an average microbatch; an image-heavy microbatch makes stage 0 the bottleneck.
B=160 samples in M=16 microbatches of 10, T=32 tokens, three workloads with the same mean of
128 patches per sample (one image per image sample, one placeholder token per image):

* ``uniform``: one image per sample, 64..192 patches;
* ``long_tail``: 10% of the samples hold 70% of the patches;
* ``mixed``: half the samples text-only, the other half 1..512 patches.

For each schedule and workload it reports the step time of the batch in a random collated
order ("natural") and balanced by ``wrap_vlm_collate_for_pp(..., balance_media=True)``, two ways:

* measured: wall time of whole steps, interleaved (natural, balanced, natural, ...) to cancel
  drift, median;
* replayed: each microbatch's forward and backward time on each stage, measured alone on the
  rank that runs the stage (thread CPU time, fastest of several runs, both ranks measuring at
  once), run through the schedule's own order of actions with free communication. On a shared,
  loaded machine the wall times mostly measure the other processes; the replay does not.

and the ideal bound, ``max(total work / ranks, critical path)`` of the balanced batch's
per-microbatch stage times. Then the model: one random order is one draw, so the replay is
repeated over 200 random orders per workload with stage 0's time a straight line fitted to its
measured times against patches and the ranks even, plus an extreme workload (every patch in one
heavy sample per microbatch, no fixed stage-0 cost) that bounds what balancing can gain on this
pipeline. The cost of planning a balanced batch is ``bench_prepare.py``'s.

The exit code is always 0: the script reports, it does not judge.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleInterleaved1F1B

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import pp_media  # noqa: E402
from pp_media._pipeline.staging import microbatch_media_kwargs  # noqa: E402

WORLD_SIZE = 2
BATCH, MICROBATCHES, SEQ = 160, 16, 32
HIDDEN, VOCAB, PATCH_DIM = 48, 128, 48
N_BLOCKS = 6
MEAN_PATCHES = 128
IMAGE_TOKEN = 1
WORKLOADS = ("uniform", "long_tail", "mixed")
SCHEDULES = ("1F1B", "Interleaved1F1B")
#: Blocks of each stage. 1F1B: stage 0 = vision + 1 block, stage 1 = 5 blocks + head;
#: interleaved: vision | 3 blocks | 1 block | 2 blocks + head. Either way rank 0 runs the
#: embeddings, the vision tower and 1 block, rank 1 runs 5 blocks and the head; the vision
#: tower's width is calibrated (``calibrate_vision_width``) so that the two ranks' work is
#: even for an average microbatch, as a user would partition a real model.
LAYOUTS = {"1F1B": [(0, 1), (1, 6)], "Interleaved1F1B": [(0, 0), (0, 3), (3, 4), (4, 6)]}


# --- workloads ------------------------------------------------------------------------------


def sample_patches(workload: str, rng: random.Random) -> list[int]:
    """Patches of each sample (0: text-only), mean ``MEAN_PATCHES``, in a random order."""
    total = BATCH * MEAN_PATCHES
    if workload == "uniform":
        patches = [rng.randint(MEAN_PATCHES // 2, 3 * MEAN_PATCHES // 2) for _ in range(BATCH)]
    elif workload == "long_tail":
        heavy = BATCH // 10
        patches = [round(0.7 * total / heavy * rng.uniform(0.85, 1.15)) for _ in range(heavy)]
        light = 0.3 * total / (BATCH - heavy)
        patches += [max(1, round(light * rng.uniform(0.5, 1.5))) for _ in range(BATCH - heavy)]
    else:
        patches = [0] * (BATCH // 2) + [rng.randint(1, 4 * MEAN_PATCHES) for _ in range(BATCH // 2)]
    rng.shuffle(patches)
    return patches


def make_batch(patches: list[int], seed: int) -> dict[str, torch.Tensor]:
    """A collated batch: one image (one placeholder token, grid [1, 1, p]) per image sample."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = len(patches)
    input_ids = torch.randint(2, VOCAB, (batch_size, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (batch_size, SEQ), generator=gen)
    has_image = torch.tensor([p > 0 for p in patches])
    input_ids[has_image, 1] = IMAGE_TOKEN
    labels[:, :2] = -100
    grids = [(1, 1, p) for p in patches if p]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.randn(sum(patches), PATCH_DIM, generator=gen),
        "image_grid_thw": torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
        "n_images_per_sample": has_image.long(),
    }


class _Fixed:
    """Collate function returning copies of one prebuilt batch (its order is the natural one)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, examples: Any) -> dict[str, torch.Tensor]:
        return dict(self.batch)


def prepared(batch: dict[str, torch.Tensor], balance: bool) -> dict[str, Any]:
    collate = pp_media.wrap_vlm_collate_for_pp(_Fixed(batch), MICROBATCHES, balance_media=balance)
    out = collate([])
    out.pop(pp_media.VLM_PP_SAMPLE_ORDER_KEY, None)
    return out


# --- the toy VLM ------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(F.gelu(self.up(self.norm(hidden))))


class Vision(nn.Module):
    """Per-patch MLP, then the mean of each image's patches: cost grows with the patches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(PATCH_DIM, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, HIDDEN)

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        features = self.out(F.gelu(self.mid(F.gelu(self.inp(pixel_values)))))
        sizes = grid.prod(dim=1)
        owner = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        pooled = features.new_zeros(sizes.numel(), HIDDEN).index_add_(0, owner, features)
        return pooled / sizes.unsqueeze(1)


class FirstStage(nn.Module):
    """Embeddings, the vision tower and some blocks."""

    def __init__(self, n_blocks: int, vision_width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.vision = Vision(vision_width)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if pixel_values is not None:
            images = self.vision(pixel_values, image_grid_thw)
            hidden = hidden.masked_scatter((input_ids == IMAGE_TOKEN).unsqueeze(-1), images)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class LaterStage(nn.Module):
    def __init__(self, n_blocks: int, last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Sequential(nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB)) if last else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden) if self.head is not None else hidden


class Loss:
    """Sum of token losses over the microbatch / label tokens of the whole batch."""

    def __init__(self) -> None:
        self.total = 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(
            logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return loss / self.total


# --- one rank ---------------------------------------------------------------------------------


def microbatch_times(
    module: nn.Module, batch: dict[str, Any], loss: Loss
) -> list[tuple[float, float]]:
    """(forward, backward) thread CPU seconds of ``module`` on each microbatch of ``batch``:
    stage 0 on the microbatch's ids and media, a later stage on random hidden states."""
    loss.total = int((batch["labels"] != -100).sum())
    media = batch[pp_media.VLM_PP_MEDIA_KEY]
    ids = torch.tensor_split(batch["input_ids"], MICROBATCHES)
    labels = torch.tensor_split(batch["labels"], MICROBATCHES)
    times = []
    for k in range(MICROBATCHES):
        start = time.thread_time()
        if isinstance(module, FirstStage):
            out = module(ids[k], **microbatch_media_kwargs({n: c[k] for n, c in media.items()}))
        else:
            out = module(torch.randn(ids[k].shape[0], SEQ, HIDDEN, requires_grad=True))
            if isinstance(module, LaterStage) and module.head is not None:
                out = loss(out, labels[k])
        middle = time.thread_time()
        out.backward(torch.ones_like(out))
        times.append((middle - start, time.thread_time() - middle))
    return times


def calibrate_vision_width(reps: int) -> tuple[int, float]:
    """The vision width at which rank 0's work (embeddings, vision, 1 block) equals rank 1's
    (5 blocks, head, loss) on the average microbatch of the uniform workload, by bisection.
    Each comparison times both modules interleaved, the fastest of ``reps`` runs each: this
    machine's slow spells last seconds and must hit both sides alike. Returns the width and
    rank 1's time per microbatch (seconds)."""
    torch.manual_seed(0)
    batch = prepared(make_batch(sample_patches("uniform", random.Random(0)), seed=0), False)
    loss = Loss()
    later = LaterStage(N_BLOCKS - 1, last=True)

    def per_microbatch(*modules: nn.Module) -> list[float]:
        runs: list[list[float]] = [[] for _ in modules]
        for rep in range(reps + 1):  # the first round warms up
            for module, times in zip(modules, runs, strict=True):
                total = sum(f + b for f, b in microbatch_times(module, batch, loss))
                if rep:
                    times.append(total / MICROBATCHES)
        return [min(times) for times in runs]

    low, high = 8, 512
    target = 0.0
    while high - low > 4:
        width = (low + high) // 2
        first, target = per_microbatch(FirstStage(1, width), later)
        if first < target:
            low = width
        else:
            high = width
    return (low + high) // 2, target


def one_f_one_b_actions(rank: int) -> list[tuple[str, int, int]]:
    """``Schedule1F1B``'s compute order on ``rank`` (one stage per rank): (ranks - rank)
    warm-up forwards, then backward / forward pairs."""
    warmup = min(MICROBATCHES, WORLD_SIZE - rank)
    order = [("F", rank, k) for k in range(warmup)]
    for k in range(MICROBATCHES):
        order.append(("B", rank, k))
        if warmup + k < MICROBATCHES:
            order.append(("F", rank, warmup + k))
    return order


class Pipeline:
    """This rank's stages of one schedule, and ways to run or time one step."""

    def __init__(self, rank: int, schedule: str, vision_width: int) -> None:
        layout = LAYOUTS[schedule]
        n_stages = len(layout)
        self.stage_ids = [rank] if n_stages == WORLD_SIZE else [rank, rank + WORLD_SIZE]
        torch.manual_seed(0)
        self.modules: list[nn.Module] = []
        for index in self.stage_ids:
            start, end = layout[index]
            if index == 0:
                self.modules.append(FirstStage(end - start, vision_width))
            else:
                self.modules.append(LaterStage(end - start, index == n_stages - 1))
        stages = [
            PipelineStage(module, index, n_stages, torch.device("cpu"))
            for module, index in zip(self.modules, self.stage_ids, strict=True)
        ]
        self.loss = Loss()
        self.first = 0 in self.stage_ids
        self.last = n_stages - 1 in self.stage_ids
        if n_stages == WORLD_SIZE:
            self.schedule = Schedule1F1B(
                stages[0], MICROBATCHES, loss_fn=self.loss, scale_grads=False
            )
        else:
            self.schedule = ScheduleInterleaved1F1B(
                stages, MICROBATCHES, loss_fn=self.loss, scale_grads=False
            )

    def step(self, batch: dict[str, Any]) -> float:
        """One step between two barriers: wall seconds."""
        self.loss.total = int((batch["labels"] != -100).sum())
        media = batch[pp_media.VLM_PP_MEDIA_KEY]
        args = (batch["input_ids"],) if self.first else ()
        target = batch["labels"] if self.last else None
        dist.barrier()
        start = time.perf_counter()
        pp_media.step_with_media(self.schedule, *args, media=media, target=target, losses=[])
        dist.barrier()
        return time.perf_counter() - start

    def stage_times(
        self, batches: dict[str, dict[str, Any]], reps: int
    ) -> dict[str, dict[str, list[list[float]]]]:
        """Per order, per stage of this rank: [forward, backward] thread CPU seconds of each
        microbatch run alone, the fastest of ``reps`` runs. CPU time and the fastest run, with
        the orders and microbatches interleaved: other processes on a shared machine inflate
        wall and CPU time alike, and their bursts must not land on one order."""
        samples: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
        for rep in range(reps + 1):  # the first round warms up
            for order, batch in batches.items():
                for module, index in zip(self.modules, self.stage_ids, strict=True):
                    for k, run in enumerate(microbatch_times(module, batch, self.loss)):
                        if rep:
                            samples.setdefault((order, index, k), []).append(run)
        return {
            order: {
                str(index): [
                    [min(part) for part in zip(*samples[order, index, k], strict=True)]
                    for k in range(MICROBATCHES)
                ]
                for index in self.stage_ids
            }
            for order in batches
        }

    def actions(self, rank: int) -> list[tuple[str, int, int]]:
        """This rank's compute actions in the order the schedule runs them: (F/B, stage, mb)."""
        if isinstance(self.schedule, ScheduleInterleaved1F1B):
            parsed = []
            for action in self.schedule.pipeline_order[rank]:
                if action is not None:
                    kind = action.computation_type.value
                    parsed.append((kind, action.stage_index, action.microbatch_index))
            return parsed
        return one_f_one_b_actions(rank)


def worker(rank: int, port: int, out_dir: str, quick: bool, vision_width: int) -> None:
    """One rank: every schedule and workload; rank 0's step times, both ranks' stage times."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(minutes=5))
    reps = 3 if quick else 11
    results: dict[str, Any] = {}
    batches = {}
    for index, workload in enumerate(WORKLOADS):
        natural = make_batch(sample_patches(workload, random.Random(index)), seed=index)
        batches[workload] = {
            "natural": prepared(natural, False),
            "balanced": prepared(natural, True),
        }
    try:
        for schedule in SCHEDULES:
            pipe = Pipeline(rank, schedule, vision_width)
            for _ in range(2):  # shape inference, warm-up
                pipe.step(batches[WORKLOADS[0]]["natural"])
            for workload in WORKLOADS:
                runs: dict[str, list[float]] = {"natural": [], "balanced": []}
                for _ in range(reps):
                    for order in runs:
                        runs[order].append(pipe.step(batches[workload][order]))
                results[f"{schedule}/{workload}"] = {
                    "steps": runs,
                    "stage_times": pipe.stage_times(batches[workload], 3 if quick else 7),
                    "actions": {str(rank): pipe.actions(rank)},
                }
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# --- report -----------------------------------------------------------------------------------


def microbatch_patches(batch: dict[str, Any]) -> list[int]:
    chunks = batch[pp_media.VLM_PP_MEDIA_KEY]["pixel_values"]
    return [chunk.shape[0] for chunk in chunks]


Times = dict[str, list[list[float]]]  # stage -> microbatch -> [forward, backward] seconds


def merged(results: list[dict[str, Any]], key: str, order: str) -> tuple[Times, dict]:
    """Both ranks' stage times and action orders of one case.

    Stages after the first do the same work in either order (same text shapes, no media), so
    their times are the faster of the two orders' measurements, microbatch by microbatch.
    """
    times: Times = {}
    actions: dict[str, list] = {}
    for rank_results in results:
        case = rank_results[key]
        for stage, per_mb in case["stage_times"][order].items():
            if stage == "0":
                times[stage] = per_mb
                continue
            other = case["stage_times"]["balanced" if order == "natural" else "natural"][stage]
            times[stage] = [
                [min(a, b) for a, b in zip(mine, theirs, strict=True)]
                for mine, theirs in zip(per_mb, other, strict=True)
            ]
        actions.update(case["actions"])
    return times, actions


def replay(times: Times, actions: dict[str, list]) -> float:
    """Step time of the schedule's own action order run with these compute times.

    Each rank runs its actions in order; F of stage s waits for F of stage s - 1, B of stage s
    for B of stage s + 1 (the last stage for its own F). Communication counts as free.
    """
    last = max(int(stage) for stage in times)
    done: dict[tuple[str, int, int], float] = {}
    clock = dict.fromkeys(actions, 0.0)
    position = dict.fromkeys(actions, 0)
    while any(position[rank] < len(actions[rank]) for rank in actions):
        moved = False
        for rank, order in actions.items():
            while position[rank] < len(order):
                kind, stage, k = order[position[rank]]
                if kind == "F":
                    needs = ("F", stage - 1, k) if stage > 0 else None
                else:
                    needs = ("B", stage + 1, k) if stage < last else ("F", stage, k)
                if needs is not None and needs not in done:
                    break
                start = max(clock[rank], done[needs] if needs is not None else 0.0)
                clock[rank] = start + times[str(stage)][k][0 if kind == "F" else 1]
                done[(kind, stage, k)] = clock[rank]
                position[rank] += 1
                moved = True
        if not moved:
            raise RuntimeError(f"replay deadlocked: {position}")
    return max(clock.values())


def ideal_bound(times: Times) -> float:
    """max(total work / ranks, the longest single-microbatch path through every stage)."""
    total = sum(f + b for per_mb in times.values() for f, b in per_mb)
    critical = max(sum(sum(per_mb[k]) for per_mb in times.values()) for k in range(MICROBATCHES))
    return max(total / WORLD_SIZE, critical)


def report(results: list[dict[str, Any]]) -> None:
    rank0 = results[0]
    reps = len(rank0[f"{SCHEDULES[0]}/{WORKLOADS[0]}"]["steps"]["natural"])
    print(
        f"\nmeasured: wall step time (ms), median of {reps} interleaved steps on 2 shared cores.\n"
        "replayed: the schedule's own action order run with each microbatch's measured forward "
        "and backward\nthread CPU time per stage (no contention, free communication); ideal = "
        "max(total work / 2 ranks, critical path)\nof the balanced batch. patches: largest "
        "microbatch, natural / balanced."
    )
    header = (
        f"{'schedule':<16} {'workload':<10} {'patches':>11} | {'natural':>8} {'balanced':>8} "
        f"{'nat/bal':>7} | {'natural':>7} {'balanced':>8} {'ideal':>6} {'nat/bal':>7} "
        f"{'ideal/bal':>9}"
    )
    print(f"{'':<39}| {'measured':<25}| replayed")
    print(header)
    print("-" * len(header))
    batches = {}
    for index, workload in enumerate(WORKLOADS):
        natural = make_batch(sample_patches(workload, random.Random(index)), seed=index)
        batches[workload] = (prepared(natural, False), prepared(natural, True))
    for schedule in SCHEDULES:
        for workload in WORKLOADS:
            key = f"{schedule}/{workload}"
            steps = rank0[key]["steps"]
            natural = statistics.median(steps["natural"])
            balanced = statistics.median(steps["balanced"])
            nat_times, actions = merged(results, key, "natural")
            bal_times, _ = merged(results, key, "balanced")
            replay_nat, replay_bal = replay(nat_times, actions), replay(bal_times, actions)
            ideal = ideal_bound(bal_times)
            patches = "{} / {}".format(*(max(microbatch_patches(b)) for b in batches[workload]))
            print(
                f"{schedule:<16} {workload:<10} {patches:>11} | {natural * 1e3:>8.1f} "
                f"{balanced * 1e3:>8.1f} {natural / balanced:>7.2f} | {replay_nat * 1e3:>7.1f} "
                f"{replay_bal * 1e3:>8.1f} {ideal * 1e3:>6.1f} {replay_nat / replay_bal:>7.2f} "
                f"{ideal / replay_bal:>9.2f}"
            )


# --- the model: many random orders --------------------------------------------------------


def extreme_patches(rng: random.Random) -> list[int]:
    """The most favourable long tail for balancing: one heavy sample per microbatch holds all
    the patches, the rest are text-only."""
    heavy = [BATCH * MEAN_PATCHES // MICROBATCHES] * MICROBATCHES
    patches = heavy + [0] * (BATCH - MICROBATCHES)
    rng.shuffle(patches)
    return patches


def microbatch_sums(values: list[int]) -> list[int]:
    """Per-microbatch sums of per-sample values, over the engine's rows per microbatch."""
    sizes = (len(chunk) for chunk in torch.tensor_split(torch.arange(BATCH), MICROBATCHES))
    bounds = [0, *itertools.accumulate(sizes)]
    return [sum(values[bounds[k] : bounds[k + 1]]) for k in range(MICROBATCHES)]


def balanced_patches(patches: list[int]) -> list[int]:
    """Per-microbatch patches after ``balance_microbatches`` with these per-sample costs."""
    batch = {"input_ids": torch.zeros(BATCH, 1, dtype=torch.int64)}
    order = pp_media.balance_microbatches(batch, BATCH, MICROBATCHES, cost=torch.tensor(patches))
    return microbatch_sums([patches[i] for i in order.tolist()])


class CaseModel(NamedTuple):
    """Stage times of one case as a function of each microbatch's patches."""

    #: (intercept, slope) of stage 0's forward and of its backward against patches.
    stage0: list[tuple[float, float]]
    #: Mean measured [forward, backward] of every later stage.
    later: dict[str, list[float]]

    def times(self, per_microbatch: list[int]) -> Times:
        (f0, f1), (b0, b1) = self.stage0
        times = {"0": [[f0 + f1 * p, b0 + b1 * p] for p in per_microbatch]}
        times.update((stage, [t] * MICROBATCHES) for stage, t in self.later.items())
        return times

    def evened(self, fixed_cost: bool = True) -> CaseModel:
        """Rank 1's stages scaled so that the ranks' work is even for a microbatch of the mean
        patches (what the calibration aims at; the later stages' measured times drift with this
        machine's slow spells). ``fixed_cost=False`` also drops stage 0's intercept."""
        stage0 = self.stage0 if fixed_cost else [(0.0, slope) for _, slope in self.stage0]
        rank0 = [stage for stage in self.later if int(stage) % WORLD_SIZE == 0]
        mean = BATCH * MEAN_PATCHES / MICROBATCHES
        work0 = sum(a + slope * mean for a, slope in stage0)
        work0 += sum(sum(self.later[stage]) for stage in rank0)
        work1 = sum(sum(t) for stage, t in self.later.items() if stage not in rank0)
        later = {
            stage: t if stage in rank0 else [x * work0 / work1 for x in t]
            for stage, t in self.later.items()
        }
        return CaseModel(stage0, later)


def case_model(results: list[dict[str, Any]], key: str) -> CaseModel:
    """Least-squares ``time = a + b * patches`` of stage 0's forward and backward over the
    measured microbatches of both orders of one case; the later stages' mean times."""
    index = WORKLOADS.index(key.split("/")[1])
    natural = make_batch(sample_patches(WORKLOADS[index], random.Random(index)), seed=index)
    xs: list[int] = []
    ys: list[list[float]] = []
    for order, balance in (("natural", False), ("balanced", True)):
        times, _ = merged(results, key, order)
        xs += microbatch_patches(prepared(natural, balance))
        ys += times["0"]
    stage0 = []
    for part in (0, 1):
        slope, intercept = statistics.linear_regression(xs, [y[part] for y in ys])
        stage0.append((intercept, slope))
    later = {
        stage: [statistics.fmean(t[part] for t in per_mb) for part in (0, 1)]
        for stage, per_mb in times.items()
        if stage != "0"
    }
    return CaseModel(stage0, later)


def modelled(results: list[dict[str, Any]], trials: int) -> None:
    """Replayed speedup over ``trials`` random natural orders of each workload (``CaseModel``,
    ranks even); ``extreme``: every patch in one heavy sample per microbatch, the rest
    text-only, no fixed stage-0 cost: no workload of this pipeline gains more from balancing."""
    print(
        f"\nmodelled: replayed natural / balanced over {trials} random natural orders per "
        "workload\n(stage 0 = intercept + slope x patches of the microbatch, fitted to the "
        "measured times above; rank 1 scaled to even ranks)"
    )
    header = (
        f"{'schedule':<16} {'workload':<10} {'mean':>6} {'p10':>6} {'p90':>6} {'max':>6} "
        f"{'ideal/bal':>9}"
    )
    print(header)
    print("-" * len(header))
    for schedule in SCHEDULES:
        for workload in (*WORKLOADS, "extreme"):
            key = f"{schedule}/{'long_tail' if workload == 'extreme' else workload}"
            _, actions = merged(results, key, "balanced")
            model = case_model(results, key).evened(fixed_cost=workload != "extreme")
            ratios, ideals = [], []
            for trial in range(trials):
                rng = random.Random(10_000 + trial)
                if workload == "extreme":
                    patches = extreme_patches(rng)
                else:
                    patches = sample_patches(workload, rng)
                balanced = model.times(balanced_patches(patches))
                replay_bal = replay(balanced, actions)
                ratios.append(replay(model.times(microbatch_sums(patches)), actions) / replay_bal)
                ideals.append(ideal_bound(balanced) / replay_bal)
            ratios.sort()
            print(
                f"{schedule:<16} {workload:<10} {statistics.fmean(ratios):>6.2f} "
                f"{ratios[trials // 10]:>6.2f} {ratios[trials * 9 // 10]:>6.2f} "
                f"{ratios[-1]:>6.2f} {statistics.fmean(ideals):>9.2f}"
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    vision_width, later_time = calibrate_vision_width(3 if args.quick else 7)
    print(
        f"torch {torch.__version__}, 2 gloo ranks x 1 thread, B={BATCH}, M={MICROBATCHES}, "
        f"T={SEQ}, hidden {HIDDEN}, {os.cpu_count()} CPUs; vision width {vision_width}, "
        f"calibrated so that both ranks take {later_time * 1e3:.1f} ms per average microbatch"
    )
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            worker,
            args=(_free_port(), out_dir, args.quick, vision_width),
            nprocs=WORLD_SIZE,
            start_method="spawn",
        )
        results = [
            json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)
        ]
    report(results)
    modelled(results, 50 if args.quick else 200)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
