"""A tiny VLM run under every torch pipeline schedule, compared with a single-process run.

Each rank of a gloo group runs every (schedule, routing mode, batch) case and writes, per case,
the largest loss and gradient differences from the reference and the media each stage-0
forward received. ``test_staging_schedules.py`` spawns it once and asserts on the results.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

import pp_media
from tests.helpers.ranks import run_cases_on_rank

VOCAB, HIDDEN, PATCH_DIM, IMAGE_TOKEN, SEQ = 32, 16, 12, 3, 40
WORLD_SIZE = 2


class VisionEmbed(nn.Module):
    """Token embedding whose image placeholders are replaced by patch features."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.patch_proj = nn.Linear(PATCH_DIM, HIDDEN)
        self.patch_mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = self.tokens(input_ids)
        placeholders = input_ids == IMAGE_TOKEN
        n_patches = 0 if pixel_values is None else pixel_values.shape[0]
        if image_grid_thw is not None and int(image_grid_thw.prod(dim=1).sum()) != n_patches:
            raise ValueError("image_grid_thw does not describe pixel_values")
        if int(placeholders.sum()) != n_patches:
            raise ValueError(
                f"image features and image tokens do not match: {int(placeholders.sum())} "
                f"tokens, {n_patches} patches"
            )
        if n_patches:
            features = self.patch_mlp(F.gelu(self.patch_proj(pixel_values)))
            hidden = hidden.masked_scatter(placeholders.unsqueeze(-1), features.to(hidden.dtype))
        return hidden


class Block(nn.Module):
    """A residual MLP block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(F.gelu(self.up(self.norm(hidden))))


class TinyVLM(nn.Module):
    """Reference model: embed (with vision), three blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = VisionEmbed()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embed(input_ids, pixel_values, image_grid_thw)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


class FirstStage(nn.Module):
    """Stage 0: embed plus some blocks; takes its media in one of three ways (``mode``)."""

    def __init__(self, model: TinyVLM, n_blocks: int, mode: str, log: list[Any]) -> None:
        super().__init__()
        self.embed = copy.deepcopy(model.embed)
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in range(n_blocks))
        self.mode = mode
        self.log = log

    def _seed_style_media(self, input_ids: torch.Tensor) -> tuple[Any, Any]:
        # Seed-era model code: advance the cursor only on microbatches with media tokens.
        chunk_idx = self._vlm_chunk_idx
        if not bool((input_ids == IMAGE_TOKEN).any()):
            return None, None
        self._vlm_chunk_idx = chunk_idx + 1
        return self._vlm_pixel_values_chunks[chunk_idx], self._vlm_image_grid_hws_chunks[chunk_idx]

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mode == "current_media":
            media = pp_media.current_media(self)
            assert media is not None, "current_media() returned None inside a staged step"
            pixel_values, image_grid_thw = media["pixel_values"], media["image_grid_thw"]
        elif self.mode == "seed_attrs":
            pixel_values, image_grid_thw = self._seed_style_media(input_ids)
        self.log.append(
            {
                "sample_ids": input_ids[:, 0].tolist(),
                "pixel_rows": 0 if pixel_values is None else int(pixel_values.shape[0]),
                "pixel_owner": [] if pixel_values is None else pixel_values[:, 0].tolist(),
            }
        )
        hidden = self.embed(input_ids, pixel_values, image_grid_thw)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class LaterStage(nn.Module):
    """A middle stage (blocks) or the last stage (blocks, norm, head)."""

    def __init__(self, model: TinyVLM, block_ids: list[int], last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in block_ids)
        self.norm = copy.deepcopy(model.norm) if last else None
        self.head = copy.deepcopy(model.head) if last else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden)) if self.head is not None else hidden


# Reference parameter name prefix of each stage module's parameters, per stage layout.
def _stage_param_names(n_stages: int) -> list[dict[str, str]]:
    """For each stage: {stage parameter name -> reference parameter name}."""
    model = TinyVLM()
    if n_stages == 2:
        layout: list[tuple[str, list[int]]] = [("first", [0]), ("last", [1, 2])]
    else:
        layout = [("first", []), ("middle", [0]), ("middle", [1]), ("last", [2])]
    mappings = []
    for kind, block_ids in layout:
        mapping: dict[str, str] = {}
        if kind == "first":
            for name, _ in model.embed.named_parameters():
                mapping[f"embed.{name}"] = f"embed.{name}"
        for local, global_id in enumerate(block_ids if kind != "first" else []):
            for name, _ in model.blocks[global_id].named_parameters():
                mapping[f"blocks.{local}.{name}"] = f"blocks.{global_id}.{name}"
        if kind == "first" and n_stages == 2:
            for name, _ in model.blocks[0].named_parameters():
                mapping[f"blocks.0.{name}"] = f"blocks.0.{name}"
        if kind == "last":
            for prefix in ("norm", "head"):
                for name, _ in getattr(model, prefix).named_parameters():
                    mapping[f"{prefix}.{name}"] = f"{prefix}.{name}"
        mappings.append(mapping)
    return mappings


def build_stage_module(
    model: TinyVLM, index: int, n_stages: int, mode: str, log: list
) -> nn.Module:
    """Stage ``index`` of ``n_stages`` cut from ``model`` (parameters copied)."""
    if n_stages == 2:
        return FirstStage(model, 1, mode, log) if index == 0 else LaterStage(model, [1, 2], True)
    if index == 0:
        return FirstStage(model, 0, mode, log)
    return LaterStage(model, [index - 1], index == n_stages - 1)


@dataclass(frozen=True)
class BatchSpec:
    """Images per sample (text-only samples first) and the grids they get."""

    images_per_sample: tuple[int, ...]
    n_microbatches: int


BATCHES = {
    "B6_M4": BatchSpec((0, 0, 2, 1, 3, 0), 4),
    "B8_M4": BatchSpec((0, 1, 0, 3, 2, 0, 1, 2), 4),
}
GRIDS = ((1, 2, 2), (1, 2, 3), (1, 4, 2), (1, 2, 1))


def make_batch(spec: BatchSpec, seed: int) -> dict[str, torch.Tensor]:
    """A collated batch: input_ids[i, 0] = i, patches whose column 0 holds their owner's id."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(spec.images_per_sample)
    input_ids = torch.randint(4, VOCAB, (batch_size, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    input_ids[:, 0] = torch.arange(batch_size) + 4
    pixel_rows, grids = [], []
    for sample, n_images in enumerate(spec.images_per_sample):
        position = 2
        for image in range(n_images):
            grid = GRIDS[(sample + image) % len(GRIDS)]
            n_patches = grid[0] * grid[1] * grid[2]
            input_ids[sample, position : position + n_patches] = IMAGE_TOKEN
            labels[sample, position : position + n_patches] = -100
            position += n_patches + 1
            patches = torch.randn(n_patches, PATCH_DIM, generator=generator)
            patches[:, 0] = sample + 4
            pixel_rows.append(patches)
            grids.append(grid)
    labels[:, -3:] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.cat(pixel_rows),
        "image_grid_thw": torch.tensor(grids, dtype=torch.int64),
        "n_images_per_sample": torch.tensor(spec.images_per_sample, dtype=torch.int64),
    }


def make_loss(total_label_tokens: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sum of token losses over the microbatch, divided by the whole batch's label tokens."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        token_loss = F.cross_entropy(
            logits.reshape(-1, VOCAB).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return token_loss / total_label_tokens

    return loss_fn


def reference(
    model: TinyVLM, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the whole model on the whole batch in one process."""
    model.zero_grad()
    total = int((batch["labels"] != -100).sum())
    logits = model(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    loss = make_loss(total)(logits, batch["labels"])
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


SINGLE_STAGE = ("GPipe", "1F1B")
SCHEDULES = {
    "GPipe": torch_schedules.ScheduleGPipe,
    "1F1B": torch_schedules.Schedule1F1B,
    "Interleaved1F1B": torch_schedules.ScheduleInterleaved1F1B,
    "LoopedBFS": torch_schedules.ScheduleLoopedBFS,
    "InterleavedZeroBubble": torch_schedules.ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": torch_schedules.ScheduleZBVZeroBubble,
    "DualPipeV": torch_schedules.ScheduleDualPipeV,
}
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
MODES = ("current_media", "seed_attrs", "kwargs", "duck_pp", "presplit_api")


class _PresplitGPipe(torch_schedules.ScheduleGPipe):
    """GPipe with torch 2.14's ``step(arg_mbs=, kwarg_mbs=, target_mbs=)`` on older torch."""

    def step(  # type: ignore[override]
        self,
        *args: Any,
        target: Any = None,
        losses: list | None = None,
        return_outputs: bool = True,
        arg_mbs: Any = None,
        kwarg_mbs: Any = None,
        target_mbs: Any = None,
        **kwargs: Any,
    ) -> Any:
        if arg_mbs is None:
            return super().step(*args, target=target, losses=losses, **kwargs)
        self.presplit_calls = getattr(self, "presplit_calls", 0) + 1
        self._stage.has_backward = self._has_backward
        self._stage.clear_runtime_states()
        self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs)
        return None


def cases() -> list[tuple[str, str, str]]:
    """(schedule, mode, batch) for every case the test runs."""
    result = []
    for schedule in SCHEDULES:
        for mode in ("current_media", "seed_attrs", "kwargs"):
            result.append((schedule, mode, "B6_M4"))
        result.append((schedule, "current_media", "B8_M4"))
    result.append(("1F1B", "duck_pp", "B6_M4"))
    result.append(("GPipe", "presplit_api", "B6_M4"))
    return result


def run_case(rank: int, schedule_name: str, mode: str, batch_name: str) -> dict[str, Any]:
    """One pipeline step; returns the errors against the reference and the routing log."""
    torch.manual_seed(0)
    model = TinyVLM()
    spec = BATCHES[batch_name]
    batch = make_batch(spec, seed=1)
    ref_loss, ref_grads = reference(model, batch)
    batch_size, n_microbatches = len(spec.images_per_sample), spec.n_microbatches

    single = schedule_name in SINGLE_STAGE
    n_stages = WORLD_SIZE if single else 2 * WORLD_SIZE
    if single:
        stage_ids = [rank]
    elif schedule_name in V_SHAPED:
        stage_ids = [rank, n_stages - 1 - rank]
    else:
        stage_ids = [rank, rank + WORLD_SIZE]
    log: list[Any] = []
    module_mode = "kwargs" if mode in ("kwargs", "presplit_api") else mode
    module_mode = "current_media" if mode == "duck_pp" else module_mode
    modules = [build_stage_module(model, i, n_stages, module_mode, log) for i in stage_ids]
    stages = [
        PipelineStage(m, i, n_stages, torch.device("cpu"))
        for m, i in zip(modules, stage_ids, strict=True)
    ]
    total = int((batch["labels"] != -100).sum())
    schedule_cls = _PresplitGPipe if mode == "presplit_api" else SCHEDULES[schedule_name]
    schedule = schedule_cls(
        stages[0] if single else stages,
        n_microbatches=n_microbatches,
        loss_fn=make_loss(total),
        scale_grads=False,
    )

    pp_media.prepare_vlm_media_for_pp(batch, batch_size, n_microbatches)
    pp_media.pad_to_even_microbatches(batch, batch_size, n_microbatches)
    holds_first = 0 in stage_ids
    holds_last = n_stages - 1 in stage_ids
    args = (batch["input_ids"],) if holds_first else ()
    target = batch["labels"] if holds_last else None
    losses: list[torch.Tensor] = []
    if mode in ("kwargs", "presplit_api"):
        media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)
        pp_media.step_with_media(schedule, *args, media=media, target=target, losses=losses)
    else:
        pp: Any = schedule
        if mode == "duck_pp":
            pp = SimpleNamespace(
                info=SimpleNamespace(has_first_stage=holds_first, schedule=schedule)
            )
        with pp_media.stage_vlm_media_for_pp(pp, modules, batch):
            schedule.step(*args, target=target, losses=losses)
        leftovers = [
            name
            for name in ("_pp_media_state", "_vlm_pixel_values_chunks")
            if getattr(modules[0], name, None) is not None
        ]
        assert not leftovers, leftovers

    mappings = _stage_param_names(n_stages)
    grad_err = 0.0
    n_grads = 0
    for module, index in zip(modules, stage_ids, strict=True):
        for name, param in module.named_parameters():
            ref = ref_grads[mappings[index][name]]
            grad = param.grad if param.grad is not None else torch.zeros_like(ref)
            grad_err = max(grad_err, (grad - ref).abs().max().item())
            n_grads += 1
    result: dict[str, Any] = {"grad_err": grad_err, "n_grads": n_grads, "log": log}
    if holds_last:
        result["loss"] = float(sum(loss.item() for loss in losses))
        result["ref_loss"] = ref_loss
    if mode == "presplit_api" and holds_first:
        result["presplit_calls"] = getattr(schedule, "presplit_calls", 0)
    result["expected_owners"] = _expected_owners(spec)
    return result


def _expected_owners(spec: BatchSpec) -> list[list[int]]:
    """Per microbatch, the sample ids (input_ids[:, 0]) the engine gives it."""
    ids = torch.arange(len(spec.images_per_sample)) + 4
    return [chunk.tolist() for chunk in torch.tensor_split(ids, spec.n_microbatches)]


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing.spawn``): every case, in order."""
    runs = (("/".join(case), partial(run_case, rank, *case)) for case in cases())
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
