"""What each part of a VLM costs per training step: measured on a sample batch, or a FLOP model.

Measured: copies of four stage shapes (stage 0 without decoder layers, a middle stage with none
and with one or two, the last stage without any) run forward and backward on the sample
batch's microbatches, exactly as the pipeline will run them, on this rank's device and dtype,
interleaved and repeated; the medians give the per-part costs in seconds (the process's CPU
time on the CPU, so that other processes on the same cores do not skew it; wall time on an
accelerator). The copies leave the
caller's model (and its gradients) alone.

FLOP model: forward+backward = 3x the forward's multiply-adds of each part's parameters over the
tokens (or vision patches) it sees, plus attention's quadratic term (full attention assumed,
also in windowed vision layers). Without a batch it assumes 1024-token samples with one image
of 1024 patches (448x448 at patch 14) each. Deterministic: every rank computes the same costs.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pp_media._hf.auto_split import StageCosts
from pp_media._hf.batch import prepare_step_inputs
from pp_media._hf.families.base import FamilyAdapter
from pp_media._hf.loss import TokenSumCrossEntropy
from pp_media._hf.pruning import prune_to_stage
from pp_media._hf.stage_module import VLMStage
from pp_media._pipeline.staging import microbatch_media_kwargs

#: The FLOP model's workload when no batch is given: tokens per sample, and one image of this
#: many vision patches per sample.
DEFAULT_TOKENS = 1024
DEFAULT_PATCHES = 1024


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention_width(text_config: Any) -> int:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads * head_dim


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None)


def _patch_numel(vision: Any) -> int:
    """Pixel values per vision patch: channels x patch area x frames per patch."""
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)
    patch = getattr(vision, "patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return channels * patch * patch * (getattr(vision, "temporal_patch_size", None) or 1)


def _patches_per_item(
    adapter: FamilyAdapter, config: Any, media: Mapping[str, torch.Tensor]
) -> list[int]:
    """Vision patches of every media item of a batch: the grid's product where the family has
    ``[t, h, w]`` grids, else each item's pixels over a patch's."""
    vision = _vision_config(config)
    items: list[int] = []
    for kind in adapter.media:
        pixels = media.get(kind.pixel_field)
        if pixels is None or pixels.shape[0] == 0:
            continue
        grid = media.get(f"{kind.name}_grid_thw")
        if grid is not None:
            items += grid.to(torch.int64).prod(-1).tolist()
        else:
            per_item = pixels[0].numel() // max(_patch_numel(vision), 1)
            items += [max(per_item, 1)] * pixels.shape[0]
    return items


def flop_stage_costs(
    model: nn.Module,
    adapter: FamilyAdapter,
    config: Any,
    batch: Mapping[str, Any] | None = None,
) -> StageCosts:
    """Per-step forward+backward FLOPs of each part from parameter counts (a meta-device model
    is fine). With ``batch``: its tokens and media; without: the default workload, per sample."""
    text_config = config.get_text_config()
    text = model.get_submodule(adapter.text_model_path)
    vision_params = sum(_numel(model.get_submodule(path)) for path in adapter.vision_paths)
    vision = _vision_config(config)
    # Qwen2-VL's vision width is ``embed_dim`` (its ``hidden_size`` is the text width).
    vision_width = getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0)
    vision_depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 0)
    if batch is None:
        samples, seq_len, items = 1, DEFAULT_TOKENS, [DEFAULT_PATCHES]
    else:
        samples, seq_len = batch["input_ids"].shape
        items = _patches_per_item(adapter, config, batch)
    tokens = samples * seq_len
    attention = 4 * samples * seq_len**2 * _attention_width(text_config)
    vision_attention = 4 * sum(p * p for p in items) * vision_width * vision_depth
    forward_first = 2 * vision_params * sum(items) + vision_attention
    forward_layer = 2 * _numel(text.layers[0]) * tokens + attention
    forward_last = 2 * _numel(model.get_submodule(adapter.head_path)) * tokens
    workload = "the batch" if batch is not None else "the default workload"
    return StageCosts(
        first=3.0 * forward_first,
        layer=3.0 * forward_layer,
        last=3.0 * forward_last,
        unit="flop",
        source=f"FLOP model of {workload}",
    )


# --- measurement ---------------------------------------------------------------------------


def _init_weights(module: nn.Module, owner: Any) -> None:
    """Initialise ``module`` and its children as their nearest Hugging Face model ancestor's
    ``_init_weights`` does (it also recomputes buffers such as rotary ``inv_freq``)."""
    owner = module if hasattr(module, "_init_weights") else owner
    owner._init_weights(module)
    for child in module.children():
        _init_weights(child, owner)


def _materialised(view: nn.Module, model: nn.Module, device: torch.device, dtype: Any) -> Any:
    """A copy of a stage view on ``device`` (random weights where the model is on meta)."""
    part = copy.deepcopy(view)
    if any(t.is_meta for t in [*part.parameters(), *part.buffers()]):
        part = part.to_empty(device=device)
        with torch.no_grad():
            _init_weights(part, model)
    return part.to(device=device, dtype=dtype)


def _stage_copy(
    model: nn.Module,
    adapter: FamilyAdapter,
    config: Any,
    index: int,
    layers: tuple[int, ...],
    device: torch.device,
    dtype: Any,
) -> VLMStage:
    """A copy of stage ``index`` of 3 (0: first, 1: middle, 2: last) holding ``layers``."""
    view = prune_to_stage(model, adapter, layers, index == 0, index == 2)
    part = _materialised(view, model, device, dtype)
    stage = VLMStage(part, adapter, config, index, 3, layers, layers[0] if layers else 0)
    return stage.train()


def _clock(device: torch.device) -> float:
    """Seconds: this process's CPU time on the CPU (other processes sharing the cores do not
    count), wall time after synchronising on an accelerator."""
    if device.type == "cpu":
        return time.process_time()
    torch.accelerator.synchronize(device)
    return time.perf_counter()


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


def _backward(outputs: tuple[torch.Tensor, ...]) -> None:
    grads = [(o, torch.ones_like(o)) for o in outputs if o.requires_grad]
    torch.autograd.backward([o for o, _ in grads], [g for _, g in grads])


def _received(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What the next stage receives: detached, floats requiring grad (as torch's stages do)."""
    return tuple(o.detach().requires_grad_(o.is_floating_point()) for o in outputs)


def measure_stage_costs(
    model: nn.Module,
    adapter: FamilyAdapter,
    config: Any,
    batch: Mapping[str, Any],
    n_microbatches: int,
    device: torch.device,
    dtype: Any = None,
    repeats: int = 5,
) -> StageCosts:
    """Seconds per step of each part, measured on ``batch`` on ``device`` (see the module)."""
    inputs = prepare_step_inputs(batch, adapter, config, n_microbatches)
    n_layers = len(model.get_submodule(adapter.text_model_path).layers)
    n_measured = min(2, n_layers)
    first = _stage_copy(model, adapter, config, 0, (), device, dtype)
    empty = _stage_copy(model, adapter, config, 1, (), device, dtype)
    layered = _stage_copy(model, adapter, config, 1, tuple(range(n_measured)), device, dtype)
    last = _stage_copy(model, adapter, config, 2, (), device, dtype)
    loss_fn = TokenSumCrossEntropy()
    loss_fn.label_tokens = inputs.label_tokens

    def chunks(value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.tensor_split(value.to(device), n_microbatches)

    ids, labels = chunks(inputs.input_ids), chunks(inputs.labels)
    split_fields = {name: chunks(value) for name, value in inputs.kwargs.items()}
    fields = [
        {name: split[k] for name, split in split_fields.items()} for k in range(n_microbatches)
    ]
    media = [
        {
            name: value.to(device)
            for name, value in microbatch_media_kwargs(
                {name: chunks_[k] for name, chunks_ in inputs.media.items()},
                adapter.media_layout,
            ).items()
        }
        for k in range(n_microbatches)
    ]
    with torch.no_grad():
        received = [
            _received(_as_tuple(first(ids[k], **fields[k], **media[k])))
            for k in range(n_microbatches)
        ]

    def run_first(k: int) -> None:
        _backward(_as_tuple(first(ids[k], **fields[k], **media[k])))

    def middle(stage: VLMStage) -> Callable[[int], None]:
        return lambda k: _backward(_as_tuple(stage(*_received(received[k]), **fields[k])))

    def run_last(k: int) -> None:
        logits = last(*_received(received[k]), **fields[k])
        loss_fn(logits, labels[k]).backward()

    parts = {"first": run_first, "empty": middle(empty), "layered": middle(layered)}
    parts["last"] = run_last
    times: dict[str, list[float]] = {name: [] for name in parts}
    for repeat in range(repeats + 1):
        for name, run in parts.items():
            started = _clock(device)
            for k in range(n_microbatches):
                run(k)
            if repeat:  # the first round warms up
                times[name].append(_clock(device) - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    return StageCosts(
        first=max(median["first"] - median["empty"], 0.0),
        layer=max((median["layered"] - median["empty"]) / n_measured, 1e-9),
        last=max(median["last"] - median["empty"], 0.0),
        stage=median["empty"],
        unit="seconds",
        source=f"measured on {device.type}, median of {repeats}",
    )
