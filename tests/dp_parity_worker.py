"""Data parallel x pipeline against the unsplit model, on 4 real gloo ranks (DP=2 x PP=2).

Each case builds the same tiny VLM on every rank; the unsplit deep copy runs the *global* batch
(both replicas' batches concatenated) as the reference. Replica r's pipeline steps its own
batch (6 samples in 4 microbatches, sample 0 text-only, 0..3 images per sample, drawn from
another seed than the other replica's), and each rank records, by the unsplit model's
parameter names, the largest difference of the gathered (``full_tensor``) gradients and, after
SGD steps, parameters from the reference. ``test_dp_parity.py`` spawns ``worker`` once for
every case and asserts on the JSON it writes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers.parity import quiet_transformers
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 4
DP_SIZE = 2
REPLICA_BATCH = 6
N_MICROBATCHES = 4
MODEL_SEED = 0
#: SGD learning rate of the parameter checks, as in the 2-rank parity tests.
LR = 0.5
#: ``clip_grad_norm_`` is checked with this fraction of the reference's norm as ``max_norm``,
#: so the clipping scales every gradient.
CLIP_FRACTION = 0.5


@dataclass(frozen=True)
class Case:
    """One DP x PP run beside the unsplit reference on the global batch."""

    name: str
    model_type: str = "qwen2_vl"
    schedule: str = "1F1B"
    tied: bool = False
    #: "fsdp", "replicate", or "none" (one 4-rank pipeline, no data parallelism).
    data_parallel: str = "fsdp"
    #: Pass a mesh built here (True) or ``dp_size`` (False).
    explicit_mesh: bool = False
    sgd_steps: int = 1
    #: Clip by ``CLIP_FRACTION`` of the reference norm before every optimizer step.
    clip: bool = False
    #: Replica 1's batch is replica 0's layout with other pixels; the pipelines swap the
    #: replicas' pixels (every check still passes): a replica routing the other's media.
    swap_media: bool = False
    #: ``mixed_precision="bf16"``; the same batch every step (the loss must fall).
    bf16: bool = False
    #: SGD learning rate (0.5 oscillates on a repeated batch; the bf16 case takes 0.2).
    lr: float = LR

    @property
    def key(self) -> str:
        return self.name


def cases() -> list[Case]:
    return [
        Case("qwen2_vl/1F1B/fsdp", sgd_steps=3, clip=True),
        Case(
            "qwen2_vl/Interleaved1F1B/fsdp",
            schedule="Interleaved1F1B",
            explicit_mesh=True,
            sgd_steps=3,
        ),
        Case("paligemma/1F1B/fsdp/tied", model_type="paligemma", tied=True, sgd_steps=3, clip=True),
        Case(
            "paligemma/ZBVZeroBubble/fsdp/tied",
            model_type="paligemma",
            schedule="ZBVZeroBubble",
            tied=True,
            sgd_steps=3,
            clip=True,
        ),
        Case("qwen2_vl/1F1B/replicate", data_parallel="replicate", clip=True),
        Case(
            "paligemma/1F1B/pp4/tied",
            model_type="paligemma",
            tied=True,
            data_parallel="none",
            clip=True,
        ),
        Case("qwen2_vl/1F1B/fsdp/swap_media", swap_media=True),
        Case("qwen2_vl/1F1B/fsdp/bf16", bf16=True, sgd_steps=3, lr=0.2),
    ]


# --- batches -------------------------------------------------------------------------------


def replica_batch(config: Any, seed: int) -> dict[str, torch.Tensor]:
    from pp_media.testing import default_seq_len, synthetic_batch

    return synthetic_batch(config, REPLICA_BATCH, default_seq_len(config), seed=seed)


def replica_batches(config: Any, case: Case, step: int) -> list[dict[str, torch.Tensor]]:
    """Both replicas' batches of ``step``: different samples and images (or, for the swap
    control, the same layout with different pixels)."""
    first = replica_batch(config, 100 * step + 1)
    if case.swap_media:
        return [first, same_layout(first, 100 * step + 7)]
    if case.bf16:
        return [replica_batch(config, 1), replica_batch(config, 2)]
    return [first, replica_batch(config, 100 * step + 2)]


def same_layout(batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``batch``'s layout (placeholders, image grids, lengths) with other pixels and other
    text tokens: swapping the pixels of two such batches passes every check."""
    generator = torch.Generator().manual_seed(seed)
    text = (batch["input_ids"] >= 10) & (batch["input_ids"] < 900)
    tokens = torch.randint(10, 900, batch["input_ids"].shape, generator=generator)
    input_ids = torch.where(text, tokens, batch["input_ids"])
    pixels = torch.randn(batch["pixel_values"].shape, generator=generator)
    labels = torch.where(batch["labels"] == -100, batch["labels"], input_ids)
    return {**batch, "input_ids": input_ids, "labels": labels, "pixel_values": pixels}


def concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The global batch: every field's rows (samples, or media items) of replica 0, then 1."""
    assert all(sorted(batch) == sorted(batches[0]) for batch in batches)
    return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}


# --- comparing -----------------------------------------------------------------------------


def _full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a DTensor (a collective over its mesh); plain tensors as they are."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def largest_difference(
    named: list[tuple[str, torch.nn.Parameter]],
    reference: dict[str, torch.nn.Parameter],
    *,
    grads: bool,
) -> dict[str, Any]:
    """Largest |pipeline - reference| over this rank's parameters (gathered from the shards),
    its parameter, the largest reference magnitude and the names without a gradient."""
    worst, worst_name, scale, missing = 0.0, "", 0.0, []
    for name, param in named:
        ref_param = reference[name]
        mine = _full(param.grad if grads else param.detach())
        ref = ref_param.grad if grads else ref_param.detach()
        if mine is None:
            if ref is not None and bool(ref.any()):
                missing.append(name)
            continue
        ref = torch.zeros_like(mine) if ref is None else ref
        diff = (mine.float() - ref).abs().max().item()
        scale = max(scale, ref.abs().max().item())
        if diff >= worst:
            worst, worst_name = diff, name
    return {"err": worst, "worst": worst_name, "scale": scale, "missing": missing}


def new_model(config: Any) -> Any:
    import transformers

    torch.manual_seed(MODEL_SEED)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.train()
    return model


# --- one case ------------------------------------------------------------------------------


def run_case(rank: int, case: Case) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    config = tiny_config(case.model_type, tie_word_embeddings=case.tied)
    source = new_model(config)
    reference = copy.deepcopy(source)
    options: dict[str, Any] = {
        "schedule": case.schedule,
        "n_microbatches": N_MICROBATCHES,
        "device": "cpu",
    }
    if case.data_parallel != "none":
        options["data_parallel"] = case.data_parallel
        if case.explicit_mesh:
            options["mesh"] = init_device_mesh(
                "cpu", (DP_SIZE, WORLD_SIZE // DP_SIZE), mesh_dim_names=("dp", "pp")
            )
        else:
            options["dp_size"] = DP_SIZE
    if case.bf16:
        options["mixed_precision"] = "bf16"
    pipe = build_vlm_pipeline(source, **options)

    full = dict(reference.named_parameters(remove_duplicate=False))
    named = list(dict(pipe.named_parameters()).items())
    result: dict[str, Any] = {
        "case": asdict(case),
        "rank": rank,
        "dp_rank": pipe.dp_rank,
        "dp_size": pipe.dp_size,
        "mesh": None if pipe.mesh is None else pipe.mesh.mesh.tolist(),
        "pp_ranks": dist.get_process_group_ranks(pipe.pp_group),
        "dp_ranks": None if pipe.dp_group is None else dist.get_process_group_ranks(pipe.dp_group),
        "stages": [stage.stage_index for stage in pipe.stages],
        "has_last_stage": pipe.has_last_stage,
        "names": sorted(name for name, _ in named),
        "sharded": any(isinstance(param, DTensor) for _, param in named),
        "local_numel": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in pipe.parameters()
        ),
        "stage_numel": sum(p.numel() for p in pipe.parameters()),
        "steps": [],
    }
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=case.lr)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=case.lr)
    for step in range(case.sgd_steps):
        batches = replica_batches(config, case, step)
        ref_loss = reference(**concatenated(batches)).loss
        ref_loss.backward()
        if case.data_parallel == "none":
            mine = concatenated(batches)
        else:
            mine = dict(batches[pipe.dp_rank])
            if case.swap_media:
                mine["pixel_values"] = batches[1 - pipe.dp_rank]["pixel_values"]
        loss = pipe.step(mine)
        record: dict[str, Any] = {"ref_loss": ref_loss.item()}
        if loss is not None:
            record["loss"] = loss.item()
        record["grad"] = largest_difference(named, full, grads=True)
        if case.clip:
            ref_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in reference.parameters() if p.grad is not None]
            )
            max_norm = CLIP_FRACTION * ref_norm.item()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
            norm = pipe.clip_grad_norm_(max_norm)
            record["norm"] = norm.item()
            record["ref_norm"] = ref_norm.item()
            record["clipped_grad"] = largest_difference(named, full, grads=True)
        ref_optimizer.step()
        optimizer.step()
        ref_optimizer.zero_grad()
        optimizer.zero_grad()
        record["param"] = largest_difference(named, full, grads=False)
        result["steps"].append(record)
    return result


def sampler_case(rank: int) -> dict[str, Any]:
    """What each rank's DataLoader yields through ``pipe.replica_sampler`` in two epochs."""
    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    pipe = build_vlm_pipeline(
        new_model(tiny_config("qwen2_vl")), dp_size=DP_SIZE, n_microbatches=N_MICROBATCHES
    )
    dataset = list(range(40))
    sampler = pipe.replica_sampler(dataset, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([batch.tolist() for batch in loader])
    return {"dp_rank": pipe.dp_rank, "epochs": epochs}


def bad_batch_case(rank: int) -> dict[str, Any]:
    """Replica 1's batch has one placeholder token too many: every rank must raise."""
    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    config = tiny_config("qwen2_vl")
    pipe = build_vlm_pipeline(new_model(config), dp_size=DP_SIZE, n_microbatches=N_MICROBATCHES)
    batch = replica_batch(config, 11 + pipe.dp_rank)
    if pipe.dp_rank == 1:
        input_ids = batch["input_ids"].clone()
        text = (input_ids[0] >= 10) & (input_ids[0] < 900)
        input_ids[0, int(text.nonzero()[0])] = config.image_token_id
        batch["input_ids"] = input_ids
    try:
        pipe.step(batch)
    except ValueError as error:
        return {"error_message": str(error), "dp_rank": pipe.dp_rank}
    return {"error_message": None, "dp_rank": pipe.dp_rank}


def mismatched_pipeline_case(rank: int) -> dict[str, Any]:
    """Rank 3 collates another batch than rank 2 of the same pipeline: every rank must raise."""
    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    config = tiny_config("qwen2_vl")
    pipe = build_vlm_pipeline(new_model(config), dp_size=DP_SIZE, n_microbatches=N_MICROBATCHES)
    batch = replica_batch(config, 21 + pipe.dp_rank + (rank == 3))
    try:
        pipe.step(batch)
    except ValueError as error:
        return {"error_message": str(error)}
    return {"error_message": None}


def option_errors_case(rank: int) -> dict[str, Any]:
    """The messages of option combinations ``build_vlm_pipeline`` refuses."""
    from torch.distributed.device_mesh import init_device_mesh

    from pp_media._hf.pipeline import build_vlm_pipeline
    from pp_media.testing import tiny_config

    model = new_model(tiny_config("qwen2_vl"))
    flat = init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("dp",))
    attempts = {
        "group_and_dp_size": {"group": dist.group.WORLD, "dp_size": DP_SIZE},
        "dp_size_not_dividing": {"dp_size": 3},
        "one_dim_mesh": {"mesh": flat},
        "unknown_mode": {"dp_size": DP_SIZE, "data_parallel": "ddp"},
        "bf16_without_dp": {"mixed_precision": "bf16"},
        "fp16": {"dp_size": DP_SIZE, "mixed_precision": torch.float16},
    }
    messages: dict[str, str | None] = {}
    for name, options in attempts.items():
        try:
            build_vlm_pipeline(model, n_microbatches=N_MICROBATCHES, **options)
        except ValueError as error:
            messages[name] = str(error)
        else:
            messages[name] = None
    return {"messages": messages}


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing`` spawn): every case, in order."""
    quiet_transformers()
    runs: list[tuple[str, Any]] = [(case.key, partial(run_case, rank, case)) for case in cases()]
    runs.append(("sampler", partial(sampler_case, rank)))
    runs.append(("bad_batch", partial(bad_batch_case, rank)))
    runs.append(("mismatched_pipeline", partial(mismatched_pipeline_case, rank)))
    runs.append(("option_errors", partial(option_errors_case, rank)))
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
