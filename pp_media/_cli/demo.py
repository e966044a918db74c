"""``pp-media demo``: pipelined training beside a single-process reference, step by step.

Locally it starts one process per pipeline rank (gloo on the CPU, NCCL on GPUs); under
``torchrun`` each process is one rank. Both runs load the same checkpoint directory (a tiny
random model saved for the run, or the user's), see the same synthetic batches and use the
same optimizer, so their losses may differ only by floating-point summation order.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pp_media._hf.partition import SCHEDULE_NAMES, plan_stages

#: Per-step loss tolerance. fp32: the pipelined run sums token losses per microbatch and
#: gradients per stage in another order than the unsplit model (a few ulps, ~1e-7 on a loss
#: near 7 after one step); AdamW divides by sqrt(v), which enlarges the relative difference of
#: the tiniest gradients, and 20 steps compound it. Measured max on the default demo: see the
#: README. Low precision has ~3 significant digits to start with.
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 2e-2}


class DemoError(ValueError):
    """An impossible option combination, reported in one line."""


@dataclass(frozen=True)
class DemoPlan:
    """Everything both runs share, resolved from the command line."""

    checkpoint: str
    model_label: str
    schedule: str
    pp_size: int
    virtual_stages: int | None
    #: Per-stage decoder layers, "auto" (from costs measured on the first batch), or None.
    layers_per_stage: tuple[int, ...] | str | None
    microbatches: int
    steps: int
    batch_size: int
    seq_len: int
    device: str
    dtype: str
    seed: int
    lr: float
    videos: bool


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _batch(config: Any, plan: DemoPlan, step: int) -> dict[str, torch.Tensor]:
    from pp_media.testing import synthetic_batch

    return synthetic_batch(
        config, plan.batch_size, plan.seq_len, seed=plan.seed * 100_003 + step, videos=plan.videos
    )


def _optimizer(params: Any, plan: DemoPlan) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)


def _resolve(args: argparse.Namespace, workdir: Path) -> DemoPlan:
    """Validate the options and make the checkpoint the runs load; one-line errors."""
    from pp_media._hf.families import adapter_for
    from pp_media.testing import (
        builds_videos,
        default_seq_len,
        fixture_for,
        text_token_ids,
        tiny_config,
        tiny_model_types,
    )

    if args.schedule.lower() not in {name.lower() for name in SCHEDULE_NAMES}:
        raise DemoError(
            f"unknown schedule {args.schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}"
        )
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise DemoError(f"unknown device {args.device!r}; choose cpu or cuda")
    if args.device.startswith("cuda") and torch.cuda.device_count() < (
        1 if _torchrun() else args.pp_size
    ):
        raise DemoError(
            f"--device cuda with --pp-size {args.pp_size} needs {args.pp_size} GPUs; "
            f"{torch.cuda.device_count()} visible"
        )
    if args.batch_size < args.microbatches:
        raise DemoError(
            f"--batch-size {args.batch_size} is smaller than --microbatches {args.microbatches}; "
            "every microbatch needs at least one sample"
        )
    model_dir = Path(args.model)
    if model_dir.is_dir():
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir)
        checkpoint, label = str(model_dir), f"{config.model_type} from {model_dir}"
    elif args.model in tiny_model_types():
        config = tiny_config(args.model)
        checkpoint, label = str(workdir / "model"), f"tiny random {args.model}"
    else:
        raise DemoError(
            f"--model {args.model!r} is neither a checkpoint directory nor one of "
            f"{', '.join(tiny_model_types())}"
        )
    try:
        adapter = adapter_for(config)
        n_layers = config.get_text_config().num_hidden_layers
        counts = None if args.layers_per_stage == "auto" else args.layers_per_stage
        plan_stages(args.schedule, args.pp_size, n_layers, args.virtual_stages, counts)
    except ValueError as error:
        raise DemoError(str(error).removeprefix("pp_media: ")) from None
    if args.videos and len(adapter.media) < 2:
        raise DemoError(f"--videos: pp_media's {config.model_type} adapter takes no videos")
    if args.videos and not builds_videos(config):
        raise DemoError(
            f"--videos: the demo builds flat video patches with video_grid_thw, which "
            f"{config.model_type} does not take"
        )
    try:
        text_token_ids(config)
    except ValueError as error:
        raise DemoError(f"--model: {str(error).removeprefix('pp_media: ')}") from None
    if args.videos and not fixture_for(config.model_type).mixes_images_and_videos:
        raise DemoError(
            f"--videos: {config.model_type} cannot take images and videos in one forward "
            "(a limit of the unsplit model in transformers), and the demo's batches mix them"
        )
    if not model_dir.is_dir():
        torch.manual_seed(args.seed)
        import transformers

        model = transformers.AutoModelForImageTextToText.from_config(config)
        model.save_pretrained(checkpoint)
    return DemoPlan(
        checkpoint=checkpoint,
        model_label=label,
        schedule=args.schedule,
        pp_size=args.pp_size,
        virtual_stages=args.virtual_stages,
        layers_per_stage=args.layers_per_stage,
        microbatches=args.microbatches,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=default_seq_len(config, videos=args.videos),
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        lr=args.lr,
        videos=args.videos,
    )


def reference_losses(plan: DemoPlan) -> list[float]:
    """The unsplit model, one process: ``model(**batch, labels=labels)`` per step."""
    import transformers
    from tqdm import tqdm

    device = torch.device("cuda" if plan.device.startswith("cuda") else "cpu")
    torch.set_num_threads(_threads_per_process(plan))
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        plan.checkpoint, dtype=_dtype(plan.dtype)
    ).to(device)
    model.train()
    optimizer = _optimizer(model.parameters(), plan)
    losses = []
    for step in tqdm(range(plan.steps), desc="reference", unit="step", file=sys.stderr):
        batch = {k: v.to(device) for k, v in _batch(model.config, plan, step).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def pipeline_rank(plan: DemoPlan, out_dir: str | None) -> dict[str, Any]:
    """One pipeline rank's whole run (the process group is already initialised)."""
    from tqdm import tqdm

    from pp_media._hf.pipeline import build_vlm_pipeline

    rank = dist.get_rank()
    device = torch.device("cpu")
    if plan.device.startswith("cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    options = {
        "schedule": plan.schedule,
        "n_microbatches": plan.microbatches,
        "stages_per_rank": plan.virtual_stages,
        "layers_per_stage": plan.layers_per_stage,
        "device": device,
        "dtype": _dtype(plan.dtype),
    }
    if plan.layers_per_stage == "auto":
        from transformers import AutoConfig

        options["sample_batch"] = _batch(AutoConfig.from_pretrained(plan.checkpoint), plan, 0)
    try:
        pipe = build_vlm_pipeline(plan.checkpoint, **options)
    except NotImplementedError as error:
        # Checkpoints whose tensors need transformers' weight converters (merged or permuted
        # on load) cannot be read stage by stage yet: load the whole model on this rank.
        import transformers

        if rank == 0:
            print(f"note: {str(error).removeprefix('pp_media: ')}", file=sys.stderr)
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            plan.checkpoint, dtype=_dtype(plan.dtype)
        )
        pipe = build_vlm_pipeline(model, **options)
        del model  # the stages keep their own parts only
    optimizer = _optimizer(pipe.parameters(), plan)
    steps = range(plan.steps)
    if pipe.has_last_stage:
        steps = tqdm(steps, desc=f"pipeline ({plan.schedule})", unit="step", file=sys.stderr)
    losses = []
    for step in steps:
        loss = pipe.step(_batch(pipe.config, plan, step))
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None:
            losses.append(loss.item())
    result = {
        "rank": rank,
        "stages": [stage.stage_index for stage in pipe.stages],
        "layers": [list(stage.layer_indices) for stage in pipe.stages],
        "parameter_bytes": sum(p.numel() * p.element_size() for p in pipe.parameters()),
        "losses": losses if pipe.has_last_stage else None,
        "costs": _costs_line(pipe.layout.costs),
    }
    if out_dir is not None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    return result


def _costs_line(costs: Any) -> str | None:
    """The automatic split's estimated cost per stage, in one line (None for other splits)."""
    if costs is None:
        return None
    scale, unit = (1e3, "ms") if costs.parts.unit == "seconds" else (1e-9, "GFLOP")
    stages = ", ".join(f"{cost * scale:.3g}" for cost in costs.stages)
    return (
        f"auto split, {costs.parts.source}: stage costs {stages} {unit} per step; slowest rank "
        f"{costs.bottleneck * scale:.3g} {unit}, ideal {costs.ideal * scale:.3g} {unit}"
    )


def _worker(local_rank: int, port: int, plan: DemoPlan, out_dir: str) -> None:
    _quiet_transformers()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if plan.device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, rank=local_rank, world_size=plan.pp_size, timeout=timedelta(minutes=5)
    )
    try:
        torch.set_num_threads(_threads_per_process(plan))
        pipeline_rank(plan, out_dir)
    finally:
        dist.destroy_process_group()


def _threads_per_process(plan: DemoPlan) -> int:
    """CPU threads per process: the cores shared out over the ranks (oversubscribed OpenMP
    threads spin against each other; on 2 cores that made a tiny model's step 30x slower)."""
    return max(1, (os.cpu_count() or 1) // plan.pp_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


def _model_bytes(plan: DemoPlan) -> int:
    from pp_media._hf.checkpoint import meta_skeleton

    skeleton = meta_skeleton(Path(plan.checkpoint), _dtype(plan.dtype))
    return sum(p.numel() * p.element_size() for p in skeleton.parameters())


def report(plan: DemoPlan, reference: list[float], ranks: list[dict[str, Any]]) -> int:
    """Print the per-rank split, the loss table and the verdict; the exit status."""
    total = _model_bytes(plan)
    for result in sorted(ranks, key=lambda r: r["rank"]):
        layers = ", ".join(
            f"stage {stage}: layers {held[0]}-{held[-1]}" if held else f"stage {stage}: no layers"
            for stage, held in zip(result["stages"], result["layers"], strict=True)
        )
        share = result["parameter_bytes"]
        print(
            f"rank {result['rank']}: {layers}; {share / 1e6:.2f} MB of the model's "
            f"{total / 1e6:.2f} MB parameters"
        )
    costs = next((r["costs"] for r in ranks if r.get("costs")), None)
    if costs:
        print(costs)
    pipelined = next(r["losses"] for r in ranks if r["losses"] is not None)
    print()
    print(f"{'step':>4}  {'reference':>12}  {'pipelined':>12}  {'|difference|':>12}")
    worst = 0.0
    for step, (ref, pipe) in enumerate(zip(reference, pipelined, strict=False)):
        difference = abs(ref - pipe)
        worst = max(worst, difference)
        print(f"{step:>4}  {ref:>12.6f}  {pipe:>12.6f}  {difference:>12.3e}")
    tolerance = TOLERANCE[plan.dtype]
    verdict = "PASS" if worst <= tolerance and len(pipelined) == plan.steps else "FAIL"
    print()
    print(
        f"{verdict}: {plan.model_label}, {plan.schedule}, {plan.pp_size} ranks, "
        f"{plan.microbatches} microbatches, {plan.steps} steps: max |loss difference| "
        f"{worst:.3e}, tolerance {tolerance:.0e} ({plan.dtype})"
    )
    return 0 if verdict == "PASS" else 1


def _quiet_transformers() -> None:
    """The demo prints its own progress; transformers' load/save bars would interleave."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _starting_notice(args: argparse.Namespace) -> None:
    """On a terminal, say at once what the first seconds go to (progress, like the bars)."""
    if sys.stderr.isatty():
        print(
            f"pp-media demo: starting: loading transformers and the {args.model} model ...",
            file=sys.stderr,
            flush=True,
        )


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _starting_notice(args)
    _quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="pp_media_demo_") as workdir:
        try:
            plan = _resolve(args, Path(workdir))
        except DemoError as error:
            print(f"pp-media demo: error: {error}", file=sys.stderr)
            return 2
        if _torchrun():
            try:
                return _run_under_torchrun(plan)
            except DemoError as error:
                print(f"pp-media demo: error: {error}", file=sys.stderr)
                return 2
        media = "images and videos" if plan.videos else "images"
        print(
            f"pp-media demo: {plan.model_label}, {media}, schedule {plan.schedule}, "
            f"{plan.pp_size} pipeline ranks, {plan.microbatches} microbatches of a "
            f"{plan.batch_size}-sample batch, {plan.steps} steps, {plan.device}, {plan.dtype}",
            flush=True,
        )
        reference = reference_losses(plan)
        out_dir = Path(workdir, "results")
        out_dir.mkdir()
        torch.multiprocessing.start_processes(
            _worker,
            args=(_free_port(), plan, str(out_dir)),
            nprocs=plan.pp_size,
            start_method="spawn",
        )
        ranks = [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]
        status = report(plan, reference, ranks)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return status


def _run_under_torchrun(plan: DemoPlan) -> int:
    """Each torchrun process is one pipeline rank; global rank 0 also runs the reference."""
    backend = "nccl" if plan.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    try:
        if dist.get_world_size() != plan.pp_size:
            raise DemoError(
                f"torchrun started {dist.get_world_size()} processes but --pp-size is "
                f"{plan.pp_size}; pass --pp-size {dist.get_world_size()}"
            )
        result = pipeline_rank(plan, None)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() != 0:
            return 0
        return report(plan, reference_losses(plan), gathered)
    finally:
        dist.destroy_process_group()
