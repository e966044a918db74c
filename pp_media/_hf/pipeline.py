"""One call from a Hugging Face VLM to this rank's pipeline stages, schedule and training step."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from pp_media._core.device import move_vlm_media_to_device
from pp_media._hf import data_parallel as dp_wrapping
from pp_media._hf.agreement import agree_on_batches
from pp_media._hf.auto_split import choose_layout
from pp_media._hf.batch import (
    StepInputs,
    prepare_step_inputs,
    reference_batch,
    shape_change_message,
)
from pp_media._hf.dtypes import resolve_dtype
from pp_media._hf.families import FamilyAdapter, adapter_for
from pp_media._hf.grad_clip import clip_grad_norm
from pp_media._hf.loss import TokenSumCrossEntropy
from pp_media._hf.mesh import ParallelGroups, mesh_wide_group, resolve_groups
from pp_media._hf.partition import StageLayout
from pp_media._hf.pruning import prune_to_stage
from pp_media._hf.router_pipeline import resolve_router_loss, router_mask
from pp_media._hf.stage_module import ROUTER_MASK, VLMStage
from pp_media._hf.tied import TiedEmbeddingSync, unique_parameters
from pp_media._keys import VLM_PP_MEDIA_KEY
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
    With data parallelism, ``mesh`` is the 2-D ``DeviceMesh`` (dims ``dp``, ``pp``), ``dp_group``
    the group of ranks holding the same stages and ``dp_rank`` / ``dp_size`` this replica's
    place; without it ``mesh`` and ``dp_group`` are None, ``dp_rank`` 0 and ``dp_size`` 1.
    ``pp_group`` is always this rank's pipeline group.
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
        groups: ParallelGroups | None = None,
        *,
        model_class: type | None = None,
        tied_embeddings: bool = False,
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
        #: The ``*ForConditionalGeneration`` class split here (what ``save_pretrained`` writes).
        self.model_class = model_class
        #: Whether the input embedding and the LM head are one matrix in the unsplit model.
        self.tied_embeddings = tied_embeddings
        self._microbatch_shape: tuple[int, ...] | None = None
        self._groups = groups if groups is not None else ParallelGroups(dist.group.WORLD)
        self._agreement_group: dist.ProcessGroup | None = None
        #: The router load-balancing loss this pipeline adds (``RouterLoss``); None: off.
        self.router_loss = getattr(loss_fn, "router_loss", None)
        #: After ``step`` / ``eval_step``, on the last stage's rank: the step's router loss
        #: ``aux`` (without ``router_aux_loss_coef``), the mean over the step's microbatches
        #: (over every replica's under data parallelism) of each microbatch's ``aux``; the
        #: step's loss includes ``coef`` times it. None elsewhere and when the router loss is off.
        self.last_router_loss: torch.Tensor | None = None

    @property
    def mesh(self) -> DeviceMesh | None:
        return self._groups.mesh

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self._groups.pp_group

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self._groups.dp_group

    @property
    def dp_rank(self) -> int:
        return self._groups.dp_rank

    @property
    def dp_size(self) -> int:
        return self._groups.dp_size

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
        return dist.get_global_rank(self.pp_group, self.layout.rank_of(self.layout.n_stages - 1))

    def broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """What ``step`` / ``eval_step`` returned, on every rank of the pipeline: a 0-d float32
        tensor broadcast from ``last_stage_rank``. A collective: call it on every rank."""
        if loss is None:
            value = torch.zeros((), dtype=torch.float32, device=self.device)
        else:
            value = loss.detach().to(device=self.device, dtype=torch.float32).reshape(())
        dist.broadcast(value, src=self.last_stage_rank, group=self.pp_group)
        return value

    def prepare(self, batch: Mapping[str, Any]) -> StepInputs:
        """What ``step`` does before running the schedule; exposed for inspection."""
        inputs = prepare_step_inputs(batch, self.adapter, self.config, self.n_microbatches)
        if self.router_loss is not None:
            rows = router_mask(
                inputs.kwargs, inputs.input_ids, batch["input_ids"].shape[0], self.n_microbatches
            )
            if rows is not None:
                inputs.kwargs[ROUTER_MASK] = rows
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

    def _prepare_replicas(self, batch: Mapping[str, Any]) -> StepInputs:
        """``prepare``, agreed over the mesh under data parallelism: the label tokens become
        the global batch's, and a bad batch on any replica raises on every rank."""
        if self.mesh is None:
            return self.prepare(batch)
        if self._agreement_group is None:
            self._agreement_group = mesh_wide_group(self._groups)
        inputs, label_tokens = agree_on_batches(
            lambda: self.prepare(batch), self._groups, self._agreement_group, self.device
        )
        inputs.label_tokens = label_tokens
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
        None elsewhere.

        With data parallelism ``batch`` is this replica's share of the global batch (every
        rank of one pipeline passes the same), the loss and the gradients are those of the
        whole global batch (the mean over all its label tokens), and a batch that fails a check
        on any replica raises the same ``ValueError`` on every rank before any compute.
        """
        inputs = self._prepare_replicas(batch)  # refuses bad input before anything changes
        self.tied.before_step()
        loss = self._run_schedule(inputs, forward_only=False)
        self.tied.sync_grads()
        return loss

    def eval_step(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's loss without a backward pass: ``model(**batch).loss`` of the unsplit
        model in eval mode under ``torch.no_grad()``, on the rank of the last stage (None
        elsewhere; under data parallelism the global batch's loss). Runs torch's forward-only
        ``schedule.eval`` with the stages in eval mode and no graph; gradients are not touched
        and each module's train/eval mode is restored. Call on every rank; same batch rules as
        ``step``. torch 2.13 runs GPipe, 1F1B, Interleaved1F1B, LoopedBFS and
        InterleavedZeroBubble forward-only; the V schedules (ZBVZeroBubble, DualPipeV) are
        refused (see ``evaluation.check_forward_only``)."""
        from pp_media._hf.evaluation import check_forward_only, forward_only

        check_forward_only(self.layout)
        inputs = self._prepare_replicas(batch)
        with forward_only(self.stages):
            return self._run_schedule(inputs, forward_only=True)

    def _run_schedule(self, inputs: StepInputs, *, forward_only: bool) -> torch.Tensor | None:
        """One schedule call over prepared inputs: the summed microbatch losses on the last
        stage's rank (over every replica under data parallelism), None elsewhere."""
        self.loss_fn.label_tokens = inputs.label_tokens
        self.loss_fn.router_losses = []
        self.last_router_loss = None
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
            layout=self.adapter.media_layout,
            **kwargs,
        )
        if losses is None:
            return None
        loss = torch.stack([loss.detach() for loss in losses]).sum()
        if self.router_loss is None:
            return dp_wrapping.sum_over_dp(loss, self.dp_group)
        # The step's microbatches are the last calls: torch's first step also calls the loss
        # once on the uninitialised outputs of its shape inference.
        auxes = self.loss_fn.router_losses[-self.n_microbatches :]
        aux = torch.stack(auxes).sum().to(loss.device)
        total, aux = dp_wrapping.sum_over_dp(torch.stack([loss, aux]), self.dp_group)
        self.last_router_loss = aux / self.loss_fn.n_terms
        return total

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        *,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Like ``torch.nn.utils.clip_grad_norm_`` on the unsplit model: the norm of every
        parameter's gradient over all stages and data-parallel shards (a tied embedding counted
        once), returned on every rank; gradients are scaled by ``max_norm / norm`` when above.
        Call on every rank of the mesh (of the pipeline without DP) after ``step``."""
        duplicate = self.tied.duplicate
        params = self.parameters()
        counted = [param for param in params if param is not duplicate]
        return clip_grad_norm(
            params,
            counted,
            max_norm,
            norm_type,
            self.pp_group,
            self.device,
            error_if_nonfinite=error_if_nonfinite,
            foreach=foreach,
        )

    def replica_sampler(
        self, dataset: Any, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> Any:
        """A ``DistributedSampler`` over the data-parallel replicas for a ``DataLoader`` of
        this replica's share: the same samples on every rank of this pipeline, disjoint ones
        across replicas (one replica without DP). Call ``set_epoch`` on it every epoch."""
        return dp_wrapping.replica_sampler(
            dataset, self.dp_rank, self.dp_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    def save_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        step: int = 0,
    ) -> None:
        """Save a training checkpoint to the directory ``path`` (``torch.distributed.checkpoint``:
        each rank writes its own shards; keys are the unsplit model's names). Call on every rank;
        ``optimizer`` is the one over ``pipe.parameters()``."""
        from pp_media._hf.checkpointing import save_checkpoint

        save_checkpoint(path, self.stages, self.adapter, self.tied_embeddings, optimizer, step)

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, optimizer: torch.optim.Optimizer | None = None
    ) -> int:
        """Load a ``save_checkpoint`` directory into this pipeline (and ``optimizer``) and return
        its step. Works for any stage split, schedule and data-parallel size of the same model.
        Call on every rank, before training (or right after an optimizer step)."""
        from pp_media._hf.checkpointing import load_checkpoint

        return load_checkpoint(path, self.stages, self.adapter, self.tied_embeddings, optimizer)

    def save_pretrained(
        self, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB"
    ) -> None:
        """Export the whole model to ``path`` as a Hugging Face directory (config, safetensors,
        an index when sharded beyond ``max_shard_size``) that ``from_pretrained`` of the
        original class loads. Call on every rank; global rank 0 writes."""
        from pp_media._hf.export import save_pretrained

        if self.model_class is None:
            raise ValueError(
                "pp_media: this pipeline does not know its model class; build it with "
                "build_vlm_pipeline to export it."
            )
        save_pretrained(
            path,
            self.stages,
            model_class=self.model_class,
            config=self.config,
            adapter=self.adapter,
            tied=self.tied_embeddings,
            send=self.dp_rank == 0,
            device=self.device,
            max_shard_size=max_shard_size,
        )


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
    mesh: DeviceMesh | None = None,
    dp_size: int | None = None,
    data_parallel: str = "fsdp",
    mixed_precision: str | torch.dtype | None = None,
    schedule: str = "1F1B",
    n_microbatches: int = 4,
    stages_per_rank: int | None = None,
    layers_per_stage: Sequence[int] | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    activation_checkpointing: bool = False,
    sample_batch: Mapping[str, Any] | None = None,
    output_router_logits: bool | None = None,
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
    the ones ``step`` will get; measured by the group's rank 0 on its device and broadcast,
    by the mesh's first rank to every replica under data parallelism), or from a FLOP model
    without one; ``pipe.layout.costs`` holds the estimate. Call on every rank of ``group``.
    ``activation_checkpointing`` recomputes each decoder layer's activations in backward
    instead of keeping them (names unchanged). ``dtype`` (a ``torch.dtype`` or its name,
    ``"bfloat16"``) casts the stages' parameters.

    Data parallel x pipeline: ``mesh`` (a 2-D ``DeviceMesh`` with dims ``dp`` and ``pp``) or
    ``dp_size`` (the mesh ``(dp_size, world // dp_size)`` over the whole world, pipelines on
    consecutive ranks) runs one pipeline per ``dp`` index, each on its own share of the global
    batch. ``data_parallel`` is ``"fsdp"`` (FSDP2 ``fully_shard`` over ``dp``: each rank keeps a
    shard of its stages' parameters, gradients and optimizer state) or ``"replicate"`` (whole
    parameters on every dp rank, gradients all-reduced); ``mixed_precision="bf16"`` computes in
    bfloat16 with fp32 parameters and fp32 gradient reduction. Call on every rank of the mesh.
    A model instance's modules are reused by the stages (moved, and wrapped for DP).

    Mixture-of-experts families with a router load-balancing loss add it as transformers does
    when the text config's ``output_router_logits`` is true (``output_router_logits`` overrides
    the config): per microbatch, ``router_aux_loss_coef * aux`` of that microbatch's tokens
    divided by the number of microbatches (``pipe.last_router_loss`` holds the step's mean
    ``aux``). With one microbatch that ``aux`` is transformers' bit for bit and the loss
    ``model(**batch).loss`` (within the token loss's summation order); with more it is the
    formula applied per microbatch, not over the whole batch (see the README).
    """
    dtype = resolve_dtype(dtype)
    if not dist.is_initialized():
        raise RuntimeError(
            "pp_media: build_vlm_pipeline needs an initialised process group "
            "(torch.distributed.init_process_group), one process per pipeline rank."
        )
    target_device = torch.device(device) if device is not None else _default_device()
    dp_wrapping.check_mode(data_parallel)
    groups = resolve_groups(group=group, mesh=mesh, dp_size=dp_size, device=target_device)
    mp_policy = dp_wrapping.mixed_precision_policy(mixed_precision, groups.mesh is not None)
    group = groups.pp_group
    pp_size = dist.get_world_size(group)
    pp_rank = dist.get_rank(group)
    global_ranks = dist.get_process_group_ranks(group)

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
        # Under DP every replica must get the same split: one measurement for the whole mesh.
        group=group if groups.mesh is None else mesh_wide_group(groups),
        device=target_device,
        dtype=dtype,
    )
    if activation_checkpointing:
        from pp_media._hf.activation import check_schedule

        check_schedule(layout.schedule_class)
    tied = _is_tied(source, adapter)
    router_loss = resolve_router_loss(
        adapter,
        config,
        source.get_submodule(adapter.text_model_path).layers,
        output_router_logits,
    )

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
            router_loss=router_loss,
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
    if activation_checkpointing:
        from pp_media._hf.activation import checkpoint_decoder_layers

        checkpoint_decoder_layers(stages, adapter)

    both_ends_here = layout.rank_of(0) == layout.rank_of(last) == pp_rank
    if groups.dp_mesh is not None:
        if tied and both_ends_here:
            dp_wrapping.untie_local_head(next(s for s in stages if s.is_last), adapter)
        dp_wrapping.wrap_stages(stages, adapter, groups.dp_mesh, data_parallel, mp_policy)
    if tied and both_ends_here and groups.dp_mesh is not None:
        tied_sync = TiedEmbeddingSync.on_one_rank(
            _local_tied_weight(stages, adapter),
            next(s for s in stages if s.is_last).get_submodule(adapter.head_path).weight,
        )
    else:
        tied_sync = TiedEmbeddingSync.create(
            tied,
            _local_tied_weight(stages, adapter),
            global_ranks[layout.rank_of(0)],
            global_ranks[layout.rank_of(last)],
        )
    loss_fn = TokenSumCrossEntropy(router_loss, n_microbatches * groups.dp_size)
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
        groups,
        model_class=type(source),
        tied_embeddings=tied,
    )
