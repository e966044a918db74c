"""``pp-media demo``: pipelined training beside a single-process reference, step by step.

Locally it starts one process per rank (gloo on the CPU, NCCL on GPUs): ``--pp-size`` ranks
per pipeline, times ``--dp-size`` data-parallel replicas; under ``torchrun`` each process is one
rank. Both runs load the same checkpoint directory (a tiny random model saved for the run, or
the user's), see the same synthetic batches and use the same optimizer, so their losses may
differ only by floating-point summation order. With data parallelism each replica draws its own
share of the global batch, and the reference runs the shares one after another, each loss
weighted by its share of the label tokens: the mean over every label token of the global batch.
"""

from __future__ import annotations

import argparse
import json
import math
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

from pp_media._hf.loss import count_label_tokens
from pp_media._hf.partition import SCHEDULE_NAMES, plan_stages

#: Per-step loss tolerance. fp32: the pipelined run sums token losses per microbatch and
#: gradients per stage in another order than the unsplit model (a few ulps, ~1e-7 on a loss
#: near 7 after one step); AdamW divides by sqrt(v), which enlarges the relative difference of
#: the tiniest gradients, and 20 steps compound it. Measured max on the default demo: see the
#: README. Low precision has ~3 significant digits to start with.
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 2e-2}
#: ``--save``: max |logits difference| between the reloaded export and the pipelined model on one
#: batch. The weights are the same bits; only the batch split differs (microbatches of 2 rows
#: against one batch of 6 can take other matmul paths): ulps of logits of magnitude ~5 in fp32,
#: and up to a few low-precision ulps otherwise.
EXPORT_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-1, "float16": 2e-2}


#: Samples per step and replica when ``--batch-size`` is not given.
DEFAULT_BATCH_PER_REPLICA = 6


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
    #: ``--save DIR``: where to export the trained model (None: no export).
    save: str | None = None
    #: Data-parallel replicas, each a pipeline of ``pp_size`` ranks on its share of the batch.
    dp_size: int = 1
    #: The family computes a router load-balancing loss: both runs add it, per microbatch
    #: (``output_router_logits=True``), and the table shows it.
    router_loss: bool = False

    @property
    def world_size(self) -> int:
        return self.dp_size * self.pp_size


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _batch(config: Any, plan: DemoPlan, step: int, replica: int = 0) -> dict[str, torch.Tensor]:
    """Replica ``replica``'s share of step ``step``'s global batch (the whole batch without
    data parallelism)."""
    from pp_media.testing import synthetic_batch

    return synthetic_batch(
        config,
        plan.batch_size // plan.dp_size,
        plan.seq_len,
        seed=plan.seed * 100_003 + step + 1_000_003 * replica,
        videos=plan.videos,
    )


def _new_model(config: Any) -> Any:
    """A random model of ``config``, built by the class stage-wise loading picks: the
    image-text-to-text auto class, or the family's own class where no auto class maps it (the
    Qwen3-Omni thinker)."""
    from pp_media._hf.checkpoint import _model_factory

    return _model_factory(config)(config)


def _pretrained_class(path: str) -> Any:
    """The class (auto or the family's own) whose ``from_pretrained`` loads the checkpoint
    directory ``path``: the one bound to ``_new_model``'s factory."""
    import transformers

    from pp_media._hf.checkpoint import _model_factory

    return _model_factory(transformers.AutoConfig.from_pretrained(path)).__self__


def _optimizer(params: Any, plan: DemoPlan) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)


def _resolve(args: argparse.Namespace, workdir: Path) -> DemoPlan:
    """Validate the options and make the checkpoint the runs load; one-line errors."""
    from pp_media._hf.families import adapter_for
    from pp_media.testing import (
        builds_videos,
        canonical_model_type,
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
    dp_size = getattr(args, "dp_size", 1)
    world = dp_size * args.pp_size
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_PER_REPLICA * dp_size
    if args.device.startswith("cuda") and torch.cuda.device_count() < (1 if _torchrun() else world):
        raise DemoError(
            f"--device cuda with --dp-size {dp_size} x --pp-size {args.pp_size} needs {world} "
            f"GPUs; {torch.cuda.device_count()} visible"
        )
    if args.batch_size % dp_size:
        raise DemoError(
            f"--batch-size {args.batch_size} is not divisible by --dp-size {dp_size}; every "
            "replica gets an equal share of the global batch"
        )
    if args.batch_size // dp_size < args.microbatches:
        share = "" if dp_size == 1 else f"'s share per replica ({args.batch_size // dp_size})"
        raise DemoError(
            f"--batch-size {args.batch_size}{share} is smaller than --microbatches "
            f"{args.microbatches}; every microbatch needs at least one sample"
        )
    model_dir = Path(args.model)
    if model_dir.is_dir():
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir)
        checkpoint, label = str(model_dir), f"{config.model_type} from {model_dir}"
    elif canonical_model_type(args.model) in tiny_model_types():
        config = tiny_config(args.model)
        checkpoint, label = str(workdir / "model"), f"tiny random {config.model_type}"
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
            f"--videos: the demo cannot lay out {config.model_type}'s videos (it builds flat "
            "patches with video_grid_thw, one row per video, or Gemma4's one row per frame)"
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
    save = getattr(args, "save", None)
    if save is not None and Path(save).exists() and not Path(save).is_dir():
        raise DemoError(f"--save {save!r} is a file; give a directory to export the model to")
    if not model_dir.is_dir():
        torch.manual_seed(args.seed)
        model = _new_model(config)
        model.save_pretrained(checkpoint)
    else:
        from pp_media._hf.checkpoint import meta_skeleton

        model = meta_skeleton(model_dir, None)
    from pp_media._hf.router_pipeline import has_router_loss

    router_loss = has_router_loss(adapter, model.get_submodule(adapter.text_model_path).layers)
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
        save=None if save is None else str(Path(save).resolve()),
        dp_size=dp_size,
        router_loss=router_loss,
    )


@dataclass
class ReferenceRun:
    """The reference's loss per step; with the router loss, also its mean per-microbatch
    ``aux`` and its whole-batch ``aux`` (mean over the replicas' shares under DP)."""

    losses: list[float]
    router_aux: list[float]
    whole_batch_aux: list[float]


def reference_losses(plan: DemoPlan) -> ReferenceRun:
    """The unsplit model, one process: ``model(**batch, labels=labels)`` per step (the
    fixture's ``reference_loss``: Llama 4's is computed from its parts, its forward fails); for
    a family with a router loss, transformers' formula applied per microbatch as the pipeline
    does (``pp_media.testing.per_microbatch_router_loss``)."""
    from tqdm import tqdm

    from pp_media.testing import per_microbatch_router_loss, reference_loss

    device = torch.device("cuda" if plan.device.startswith("cuda") else "cpu")
    torch.set_num_threads(_threads_per_process(plan))
    model = (
        _pretrained_class(plan.checkpoint)
        .from_pretrained(plan.checkpoint, dtype=_dtype(plan.dtype))
        .to(device)
    )
    model.train()
    optimizer = _optimizer(model.parameters(), plan)
    run = ReferenceRun([], [], [])
    for step in tqdm(range(plan.steps), desc="reference", unit="step", file=sys.stderr):
        shares = [
            {k: v.to(device) for k, v in _batch(model.config, plan, step, replica).items()}
            for replica in range(plan.dp_size)
        ]
        tokens = [count_label_tokens(share["labels"]) for share in shares]
        loss_sum, aux, whole = 0.0, 0.0, 0.0
        for share, share_tokens in zip(shares, tokens, strict=True):
            weight = share_tokens / max(sum(tokens), 1)
            if plan.router_loss:
                router = per_microbatch_router_loss(model, share, plan.microbatches)
                # Under DP the token loss is the global mean; each of the dp x M microbatches
                # adds coef * aux / (dp x M).
                loss = router.token_loss * weight + router.router_term / plan.dp_size
                if plan.dp_size == 1:
                    loss = router.loss
                aux += router.mean_aux / plan.dp_size
                whole += router.whole_batch_aux / plan.dp_size
            else:
                loss = reference_loss(model, share)
                if plan.dp_size > 1:  # mean over the global batch: weight by the share's tokens
                    loss = loss * weight
            loss.backward()
            loss_sum += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        run.losses.append(loss_sum)
        if plan.router_loss:
            run.router_aux.append(aux)
            run.whole_batch_aux.append(whole)
    return run


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
        "output_router_logits": plan.router_loss or None,
    }
    if plan.dp_size > 1:
        options["dp_size"] = plan.dp_size
    if plan.layers_per_stage == "auto":
        from transformers import AutoConfig

        options["sample_batch"] = _batch(AutoConfig.from_pretrained(plan.checkpoint), plan, 0)
    try:
        pipe = build_vlm_pipeline(plan.checkpoint, **options)
    except NotImplementedError as error:
        # Checkpoints whose tensors need transformers' weight converters (merged or permuted
        # on load) cannot be read stage by stage yet: load the whole model on this rank.

        if rank == 0:
            print(f"note: {str(error).removeprefix('pp_media: ')}", file=sys.stderr)
        model = _pretrained_class(plan.checkpoint).from_pretrained(
            plan.checkpoint, dtype=_dtype(plan.dtype)
        )
        pipe = build_vlm_pipeline(model, **options)
        del model  # the stages keep their own parts only
    optimizer = _optimizer(pipe.parameters(), plan)
    steps = range(plan.steps)
    if pipe.has_last_stage and pipe.dp_rank == 0:
        steps = tqdm(steps, desc=f"pipeline ({plan.schedule})", unit="step", file=sys.stderr)
    losses, router_losses = [], []
    for step in steps:
        loss = pipe.step(_batch(pipe.config, plan, step, pipe.dp_rank))
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None:
            losses.append(loss.item())
        if pipe.last_router_loss is not None:
            router_losses.append(pipe.last_router_loss.item())
    exported = _export(pipe, plan) if plan.save is not None else None
    result = {
        "rank": rank,
        "dp_rank": pipe.dp_rank,
        "stages": [stage.stage_index for stage in pipe.stages],
        "layers": [list(stage.layer_indices) for stage in pipe.stages],
        "parameter_bytes": sum(_local_bytes(p) for p in pipe.parameters()),
        "losses": losses if pipe.has_last_stage else None,
        "router_losses": router_losses if pipe.has_last_stage else None,
        "export": exported,
        "costs": _costs_line(pipe.layout.costs),
    }
    if out_dir is not None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    return result


def _export(pipe: Any, plan: DemoPlan) -> dict[str, Any] | None:
    """``pipe.save_pretrained(plan.save)``, then, on each replica's last-stage rank, the logits
    of the model transformers reloads from there against the pipeline's on a batch not trained
    on (the replica's share of one more step)."""

    from pp_media._hf.forward import forward_logits

    assert plan.save is not None
    pipe.save_pretrained(plan.save)
    batch = _batch(pipe.config, plan, plan.steps, pipe.dp_rank)
    logits = forward_logits(pipe, batch)
    if logits is None:
        return None
    model = (
        _pretrained_class(plan.save)
        .from_pretrained(plan.save, dtype=_dtype(plan.dtype))
        .to(pipe.device)
    )
    model.eval()
    with torch.no_grad():
        reloaded = model(**{k: v.to(pipe.device) for k, v in batch.items()}).logits
    return {
        "class": type(model).__name__,
        "logits_diff": (reloaded.float() - logits.float()).abs().max().item(),
        "logits_scale": logits.float().abs().max().item(),
    }


def _local_bytes(param: torch.Tensor) -> int:
    """Bytes of ``param`` this rank holds: its shard under FSDP."""
    from torch.distributed.tensor import DTensor

    local = param.to_local() if isinstance(param, DTensor) else param
    return local.numel() * local.element_size()


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
        backend, rank=local_rank, world_size=plan.world_size, timeout=timedelta(minutes=5)
    )
    try:
        torch.set_num_threads(_threads_per_process(plan))
        pipeline_rank(plan, out_dir)
    finally:
        dist.destroy_process_group()


def _threads_per_process(plan: DemoPlan) -> int:
    """CPU threads per process: the cores shared out over the ranks (oversubscribed OpenMP
    threads spin against each other; on 2 cores that made a tiny model's step 30x slower)."""
    return max(1, (os.cpu_count() or 1) // plan.world_size)


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


def report(plan: DemoPlan, reference: ReferenceRun, ranks: list[dict[str, Any]]) -> int:
    """Print the per-rank split, the loss table and the verdict; the exit status. With a
    router loss the table adds the pipeline's router ``aux`` (the mean over its microbatches)
    and the reference's whole-batch ``aux``, and a line their gap."""
    total = _model_bytes(plan)
    for result in sorted(ranks, key=lambda r: r["rank"]):
        layers = ", ".join(
            f"stage {stage}: layers {held[0]}-{held[-1]}" if held else f"stage {stage}: no layers"
            for stage, held in zip(result["stages"], result["layers"], strict=True)
        )
        share = result["parameter_bytes"]
        replica = f"replica {result['dp_rank']}, " if plan.dp_size > 1 else ""
        print(
            f"rank {result['rank']}: {replica}{layers}; {share / 1e6:.2f} MB of the model's "
            f"{total / 1e6:.2f} MB parameters"
        )
    costs = next((r["costs"] for r in ranks if r.get("costs")), None)
    if costs:
        print(costs)
    pipelined = next(r["losses"] for r in ranks if r["losses"] is not None)
    router = next(r["router_losses"] for r in ranks if r["losses"] is not None)
    print()
    header = f"{'step':>4}  {'reference':>12}  {'pipelined':>12}  {'|difference|':>12}"
    if plan.router_loss:
        header += f"  {'router aux':>12}  {'batch aux':>12}"
    print(header)
    worst = 0.0
    for step, (ref, pipe) in enumerate(zip(reference.losses, pipelined, strict=False)):
        difference = abs(ref - pipe)
        worst = max(worst, difference)
        row = f"{step:>4}  {ref:>12.6f}  {pipe:>12.6f}  {difference:>12.3e}"
        if plan.router_loss and step < len(router):
            row += f"  {router[step]:>12.6f}  {reference.whole_batch_aux[step]:>12.6f}"
        print(row)
    tolerance = TOLERANCE[plan.dtype]
    complete = len(pipelined) == plan.steps
    if plan.router_loss:
        complete = complete and len(router) == plan.steps
        router_worst = _report_router(plan, reference, router)
        complete = complete and math.isfinite(router_worst)
        worst = max(worst, router_worst)
    verdict = "PASS" if complete and worst <= tolerance else "FAIL"
    print()
    print(
        f"{verdict}: {plan.model_label}, {plan.schedule}, {_verdict_ranks(plan)}, "
        f"{plan.microbatches} microbatches, {plan.steps} steps: max |loss difference| "
        f"{worst:.3e}, tolerance {tolerance:.0e} ({plan.dtype})"
    )
    passed = verdict == "PASS"
    if plan.save is not None:
        reports = [r["export"] for r in ranks if r.get("export")]  # one per replica
        exported = max(reports, key=lambda r: r["logits_diff"], default=None)
        passed = _report_export(plan, exported) == "PASS" and passed
    return 0 if passed else 1


def _report_router(plan: DemoPlan, reference: ReferenceRun, router: list[float]) -> float:
    """The router-loss line: the pipeline's mean per-microbatch ``aux`` against the whole-batch
    ``aux`` (the form a pipeline cannot compute); returns the largest difference between the
    pipeline's and the reference's per-microbatch ``aux``."""
    gaps = [mine - whole for mine, whole in zip(router, reference.whole_batch_aux, strict=False)]
    agree = [abs(a - b) for a, b in zip(router, reference.router_aux, strict=False)]
    if not gaps:
        return math.inf
    print()
    print(
        f"router loss (aux, without the coefficient): the pipeline adds it per microbatch; "
        f"its mean over the {plan.microbatches} microbatches minus the whole-batch aux: mean "
        f"{sum(gaps) / len(gaps):+.3e}, largest {max(gaps, key=abs):+.3e} over {len(gaps)} "
        f"steps; max |difference| from the reference's per-microbatch aux {max(agree):.3e}"
    )
    return math.nan if any(math.isnan(d) for d in agree) else max(agree)


def _report_export(plan: DemoPlan, exported: dict[str, Any] | None) -> str:
    """The ``--save`` line: the reloaded export's logits against the pipeline's."""
    if exported is None:
        print(f"FAIL: export to {plan.save}: no rank reported the reloaded model's logits")
        return "FAIL"
    tolerance = EXPORT_TOLERANCE[plan.dtype]
    verdict = "PASS" if exported["logits_diff"] <= tolerance else "FAIL"
    print(
        f"{verdict}: exported to {plan.save}; transformers reloads it as {exported['class']}: "
        f"max |logits difference| {exported['logits_diff']:.3e} against the pipelined model "
        f"(logits up to {exported['logits_scale']:.2f}), tolerance {tolerance:.0e} ({plan.dtype})"
    )
    return verdict


def _ranks(plan: DemoPlan) -> str:
    if plan.dp_size == 1:
        return f"{plan.pp_size} pipeline ranks"
    return f"{plan.dp_size} data-parallel x {plan.pp_size} pipeline ranks"


def _verdict_ranks(plan: DemoPlan) -> str:
    if plan.dp_size == 1:
        return f"{plan.pp_size} ranks"
    return f"{plan.dp_size} x {plan.pp_size} ranks (DP x PP)"


def _batch_words(plan: DemoPlan) -> str:
    if plan.dp_size == 1:
        return f"{plan.batch_size}-sample batch"
    share = plan.batch_size // plan.dp_size
    return f"{share}-sample share of a {plan.batch_size}-sample global batch"


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
            f"{_ranks(plan)}, {plan.microbatches} microbatches of a {_batch_words(plan)}, "
            f"{plan.steps} steps, {plan.device}, {plan.dtype}",
            flush=True,
        )
        reference = reference_losses(plan)
        out_dir = Path(workdir, "results")
        out_dir.mkdir()
        torch.multiprocessing.start_processes(
            _worker,
            args=(_free_port(), plan, str(out_dir)),
            nprocs=plan.world_size,
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
        if dist.get_world_size() != plan.world_size:
            raise DemoError(
                f"torchrun started {dist.get_world_size()} processes but --dp-size "
                f"{plan.dp_size} x --pp-size {plan.pp_size} is {plan.world_size}; pass sizes "
                f"whose product is {dist.get_world_size()}"
            )
        result = pipeline_rank(plan, None)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() != 0:
            return 0
        return report(plan, reference_losses(plan), gathered)
    finally:
        dist.destroy_process_group()
