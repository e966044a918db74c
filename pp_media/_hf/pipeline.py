"""One call from a Hugging Face VLM to this rank's pipeline stages, schedule and training step."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from pp_media._core.device import move_vlm_media_to_device
from pp_media._hf.auto_split import choose_layout
from pp_media._hf.batch import (
    StepInputs,
    prepare_step_inputs,
    reference_batch,
    shape_change_message,
)
from pp_media._hf.dtypes import resolve_dtype
from pp_media._hf.families import FamilyAdapter, adapter_for
from pp_media._hf.loss import TokenSumCrossEntropy
from pp_media._hf.partition import StageLayout
from pp_media._hf.pruning import prune_to_stage
from pp_media._hf.stage_module import VLMStage
from pp_media._hf.tied import TiedEmbeddingSync, unique_parameters
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._pipeline.locate import schedule_stages
from pp_media._pipeline.step import step_with_media


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _is_tied(model: nn.Module, adapter: FamilyAdapter) -> bool:
    head = model.get_submodule(adapter.head_path)
    embed = model.get_submodule(adapter.text_model_path).embed_tokens
    return head.weight is embed.weight


def check_partition(model: nn.Module, stages: Sequence[nn.Module]) -> None:
    """Across all stages, every parameter of ``model`` is held exactly once (a tied LM head
    may repeat the embedding). Catches family adapters that miss or duplicate a part."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    held: dict[str, int] = {}
    for stage in stages:
        for name, _ in stage.named_parameters(remove_duplicate=False):
            held[name] = held.get(name, 0) + 1
    missing = sorted(names - held.keys())
    repeated = sorted(name for name, count in held.items() if count > 1)
    if missing or repeated:
        raise ValueError(
            "pp_media: the stage split does not hold every parameter exactly once; missing "
            f"{missing[:5]}, repeated {repeated[:5]}. The family adapter's part paths are wrong."
        )


class VLMPipeline:
    """This rank's part of a pipelined Hugging Face VLM.

    ``stages`` are this rank's stage modules (parameter names are the unsplit model's),
    ``schedule`` the torch schedule running them; ``step(batch)`` runs a whole training step.
    """

    def __init__(
        self,
        stages: list[VLMStage],
        schedule: Any,
        layout: StageLayout,
        adapter: FamilyAdapter,
        config: Any,
        loss_fn: TokenSumCrossEntropy,
        tied: TiedEmbeddingSync,
        n_microbatches: int,
        device: torch.device,
    ) -> None:
        self.stages = stages
        self.schedule = schedule
        self.layout = layout
        self.adapter = adapter
        self.config = config
        self.loss_fn = loss_fn
        self.tied = tied
        self.n_microbatches = n_microbatches
        self.device = device
        self._microbatch_shape: tuple[int, ...] | None = None

    @property
    def has_first_stage(self) -> bool:
        return any(stage.is_first for stage in self.stages)

    @property
    def has_last_stage(self) -> bool:
        return any(stage.is_last for stage in self.stages)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (give them to the optimizer)."""
        return unique_parameters(self.stages)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters as ``(name, parameter)`` pairs under the unsplit model's
        names, like ``nn.Module.named_parameters`` (same arguments). With tied embeddings,
        stage 0's rank holds ``...embed_tokens.weight`` and the last stage's rank its own copy
        as ``lm_head.weight``; where one rank runs both (V schedules) they are one parameter,
        yielded once as the embedding (``remove_duplicate=False`` yields both names)."""
        seen: set[int] = set()
        for stage in self.stages:
            for name, param in stage.named_parameters(
                prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate
            ):
                if remove_duplicate and id(param) in seen:
                    continue
                seen.add(id(param))
                yield name, param

    @property
    def last_stage_rank(self) -> int:
        """Global rank that runs the last stage, where ``step`` and ``eval_step`` return the
        loss (rank 0 of the pipeline group for V schedules, its last rank otherwise)."""
        group = self._group()
        return dist.get_global_rank(group, self.layout.rank_of(self.layout.n_stages - 1))

    def broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """What ``step`` / ``eval_step`` returned, on every rank of the pipeline: a 0-d float32
        tensor broadcast from ``last_stage_rank``. A collective: call it on every rank."""
        if loss is None:
            value = torch.zeros((), dtype=torch.float32, device=self.device)
        else:
            value = loss.detach().to(device=self.device, dtype=torch.float32).reshape(())
        dist.broadcast(value, src=self.last_stage_rank, group=self._group())
        return value

    def _group(self) -> dist.ProcessGroup:
        """The pipeline's process group, as torch's stages hold it."""
        stages = schedule_stages(self.schedule)
        if not stages:
            raise RuntimeError("pp_media: this VLMPipeline has no torch schedule to read from.")
        return stages[0].group

    def prepare(self, batch: Mapping[str, Any]) -> StepInputs:
        """What ``step`` does before running the schedule; exposed for inspection."""
        inputs = prepare_step_inputs(batch, self.adapter, self.config, self.n_microbatches)
        shape = (inputs.input_ids.shape[0] // self.n_microbatches, *inputs.input_ids.shape[1:])
        if self._microbatch_shape is None:
            self._microbatch_shape = shape
        elif shape != self._microbatch_shape:
            raise ValueError(
                shape_change_message(
                    tuple(batch["input_ids"].shape),
                    shape,
                    self._microbatch_shape,
                    self.n_microbatches,
                )
            )
        return inputs

    def reference_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` as the unsplit model takes it: ``model(**pipe.reference_batch(batch))
        .loss`` equals ``pipe.step(batch)``. Adds the fields a step derives when the batch
        lacks them (Qwen-VL's ``mm_token_type_ids``) and leaves out the per-sample counts
        (``n_images_per_sample``, ...) that only align media; a new dict of the same tensors."""
        return reference_batch(batch, self.adapter, self.config)

    def step(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Forward and backward of one collated batch on every rank; gradients accumulate
        into this rank's parameters. Returns the batch's loss (Hugging Face's ``labels=``
        loss), a detached 0-d tensor, on the rank of the last stage (``last_stage_rank``),
        None elsewhere."""
        inputs = self.prepare(batch)  # refuses bad input before anything changes
        self.tied.before_step()
        loss = self._run_schedule(inputs, forward_only=False)
        self.tied.sync_grads()
        return loss

    def eval_step(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's loss without a backward pass: ``model(**batch).loss`` of the unsplit
        model in eval mode under ``torch.no_grad()``, on the rank of the last stage (None
        elsewhere). Runs torch's forward-only ``schedule.eval`` with the stages in eval mode
        and no graph; gradients are not touched and each module's train/eval mode is restored.
        Call on every rank; same batch rules as ``step``. torch 2.13 runs GPipe, 1F1B,
        Interleaved1F1B, LoopedBFS and InterleavedZeroBubble forward-only; the V schedules
        (ZBVZeroBubble, DualPipeV) are refused (see ``evaluation.check_forward_only``)."""
        from pp_media._hf.evaluation import check_forward_only, forward_only

        check_forward_only(self.layout)
        inputs = self.prepare(batch)
        with forward_only(self.stages):
            return self._run_schedule(inputs, forward_only=True)

    def _run_schedule(self, inputs: StepInputs, *, forward_only: bool) -> torch.Tensor | None:
        """One schedule call over prepared inputs: the summed microbatch losses on the last
        stage's rank, None elsewhere."""
        self.loss_fn.label_tokens = inputs.label_tokens
        losses: list[torch.Tensor] | None = [] if self.has_last_stage else None
        kwargs = {name: value.to(self.device) for name, value in inputs.kwargs.items()}
        moved = move_vlm_media_to_device({VLM_PP_MEDIA_KEY: inputs.media}, self.device)
        media = moved[VLM_PP_MEDIA_KEY]
        step_with_media(
            self.schedule,
            inputs.input_ids.to(self.device),
            media=media,
            target=inputs.labels.to(self.device) if self.has_last_stage else None,
            losses=losses,
            return_outputs=False,
            forward_only=forward_only,
            **kwargs,
        )
        if losses is None:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()


def _load_model_source(
    model: nn.Module | str | os.PathLike[str], dtype: torch.dtype | None
) -> tuple[nn.Module, Path | None]:
    """The model to prune: the given one, or a meta-device skeleton of a checkpoint directory."""
    if isinstance(model, nn.Module):
        return model, None
    from pp_media._hf.checkpoint import meta_skeleton

    path = Path(model)
    return meta_skeleton(path, dtype), path


def _local_tied_weight(stages: Sequence[VLMStage], adapter: FamilyAdapter) -> nn.Parameter | None:
    """This rank's copy of a tied embedding matrix: stage 0's embedding, else the LM head."""
    for stage in stages:
        if stage.is_first:
            return stage.get_submodule(adapter.text_model_path).embed_tokens.weight
    for stage in stages:
        if stage.is_last:
            return stage.get_submodule(adapter.head_path).weight
    return None


def _torch_schedule(
    layout: StageLayout,
    stages: Sequence[VLMStage],
    group: dist.ProcessGroup,
    device: torch.device,
    n_microbatches: int,
    loss_fn: TokenSumCrossEntropy,
) -> Any:
    """torch's own stages and schedule; losses and gradients are not scaled by the schedule
    (the loss is already normalised by the batch's label tokens)."""
    pipeline_stages = [
        PipelineStage(stage, stage.stage_index, layout.n_stages, device, group=group)
        for stage in stages
    ]
    options: dict[str, Any] = {"loss_fn": loss_fn, "scale_grads": False}
    if issubclass(layout.schedule_class, PipelineScheduleSingle):
        return layout.schedule_class(pipeline_stages[0], n_microbatches, **options)
    return layout.schedule_class(pipeline_stages, n_microbatches, **options)


def build_vlm_pipeline(
    model: nn.Module | str | os.PathLike[str],
    *,
    group: dist.ProcessGroup | None = None,
    schedule: str = "1F1B",
    n_microbatches: int = 4,
    stages_per_rank: int | None = None,
    layers_per_stage: Sequence[int] | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    sample_batch: Mapping[str, Any] | None = None,
) -> VLMPipeline:
    """Split a Hugging Face ``*ForConditionalGeneration`` VLM into pipeline stages.

    ``model`` is a model instance or a local checkpoint directory (``save_pretrained``
    output); from a directory, this rank builds the model on the meta device and reads only
    its own stages' tensors. ``group`` is the pipeline process group (default: the whole
    world). ``schedule`` is one of torch's schedule names; ``stages_per_rank`` defaults to 1
    (GPipe, 1F1B) or 2 (interleaved and V schedules); decoder layers are balanced over the
    stages unless ``layers_per_stage`` says otherwise: per-stage counts (``[1, 3]`` or
    ``"1,3"``), or ``"auto"``, which picks the counts minimising the slowest rank's cost
    (stage 0 may get none), from costs measured on ``sample_batch`` (a collated batch like
    the ones ``step`` will get; measured by the group's rank 0 on its device and broadcast),
    or from a FLOP model without one; ``pipe.layout.costs`` holds the estimate. ``dtype`` (a
    ``torch.dtype`` or its name, ``"bfloat16"``) casts the stages' parameters. Call on every
    rank of ``group``.
    """
    dtype = resolve_dtype(dtype)
    if not dist.is_initialized():
        raise RuntimeError(
            "pp_media: build_vlm_pipeline needs an initialised process group "
            "(torch.distributed.init_process_group), one process per pipeline rank."
        )
    group = group if group is not None else dist.group.WORLD
    pp_size = dist.get_world_size(group)
    pp_rank = dist.get_rank(group)
    global_ranks = dist.get_process_group_ranks(group)
    target_device = torch.device(device) if device is not None else _default_device()

    source, checkpoint = _load_model_source(model, dtype)
    config = source.config
    adapter = adapter_for(config)
    layout = choose_layout(
        source,
        adapter,
        config,
        schedule,
        pp_size,
        stages_per_rank,
        layers_per_stage,
        sample_batch=sample_batch,
        n_microbatches=n_microbatches,
        group=group,
        device=target_device,
        dtype=dtype,
    )
    tied = _is_tied(source, adapter)

    last = layout.n_stages - 1
    all_views = [
        prune_to_stage(source, adapter, layout.layers[s], s == 0, s == last)
        for s in range(layout.n_stages)
    ]
    check_partition(source, all_views)
    local = layout.stages_of(pp_rank)
    stages = [
        VLMStage(
            all_views[s],
            adapter,
            config,
            s,
            layout.n_stages,
            layout.layers[s],
            layout.first_layer(s),
        )
        for s in local
    ]
    if checkpoint is not None:
        from pp_media._hf.checkpoint import load_stage_weights

        load_stage_weights(stages, source, checkpoint, target_device, dtype)
    else:
        for stage in stages:
            stage.to(device=target_device, dtype=dtype)
    for stage in stages:
        stage.train()

    tied_sync = TiedEmbeddingSync.create(
        tied,
        _local_tied_weight(stages, adapter),
        global_ranks[layout.rank_of(0)],
        global_ranks[layout.rank_of(last)],
    )
    loss_fn = TokenSumCrossEntropy()
    torch_schedule = _torch_schedule(layout, stages, group, target_device, n_microbatches, loss_fn)
    return VLMPipeline(
        stages,
        torch_schedule,
        layout,
        adapter,
        config,
        loss_fn,
        tied_sync,
        n_microbatches,
        target_device,
    )
