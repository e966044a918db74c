"""Export of a pipelined model as one Hugging Face directory that ``from_pretrained`` loads.

Every rank gathers its stages' full tensors (FSDP2 shards become whole with torch's full state
dict, a collective within each data-parallel group); one data-parallel replica's ranks send them,
tensor by tensor, to global rank 0, which alone writes. It writes through transformers' own
``save_pretrained`` of a meta-device skeleton of the model's class, given the gathered state
dict: the config, ``model.safetensors`` or shards plus ``model.safetensors.index.json`` beyond
``max_shard_size``, a tied LM head dropped as transformers drops it, and key names reverted to
the checkpoint format that ``from_pretrained`` of that class converts from.

Rank 0 holds the whole model on the CPU while it writes (as transformers' own gathered save
does); the other ranks hold only their stages.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pp_media._hf.checkpointing import _RankStages
from pp_media._hf.families.base import FamilyAdapter

WRITER = 0
#: (name, shape, dtype) of each tensor a rank sends, in sending order.
Manifest = list[tuple[str, tuple[int, ...], torch.dtype]]


def full_stage_tensors(stages: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers by the unsplit model's names, whole
    (DTensor shards gathered within their data-parallel group: every rank of it must call)."""
    gathered = get_model_state_dict(
        _RankStages(stages), options=StateDictOptions(full_state_dict=True)
    )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in gathered.items():
        tensors.setdefault(key.split(".", 1)[1], value)
    return tensors


def _gather_to_writer(
    tensors: dict[str, torch.Tensor], send: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """On the writer, every sending rank's tensors on the CPU; elsewhere an empty dict.
    Tensors travel one at a time through ``device`` (the process group's device)."""
    rank = dist.get_rank()
    manifest: Manifest = (
        [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()] if send else []
    )
    manifests: list[Manifest | None] = [None] * dist.get_world_size()
    dist.all_gather_object(manifests, manifest)
    if rank != WRITER:
        for name, _, _ in manifest:
            dist.send(tensors[name].detach().to(device).contiguous(), dst=WRITER)
        return {}
    result = {name: t.detach().cpu() for name, t in tensors.items()} if send else {}
    for source, listed in enumerate(manifests):
        if source == WRITER:
            continue
        for name, shape, dtype in listed or ():
            buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buffer, src=source)
            result.setdefault(name, buffer.cpu())
    return result


def _skeleton(model_class: type, config: Any, dtype: torch.dtype) -> Any:
    """The model class built on the meta device from a copy of ``config`` (transformers writes
    the dtype and architecture into the config it saves)."""
    with torch.device("meta"):
        return model_class._from_config(copy.deepcopy(config), dtype=dtype)


def _write(
    path: Path,
    state: dict[str, torch.Tensor],
    model_class: type,
    config: Any,
    adapter: FamilyAdapter,
    tied: bool,
    max_shard_size: int | str,
) -> None:
    embed = f"{adapter.text_model_path}.embed_tokens.weight"
    head = f"{adapter.head_path}.weight"
    if tied:
        # One tensor under both names, as in the unsplit model: transformers keeps the one its
        # tied-weights rule names and drops the other.
        state[head] = state[embed]
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    skeleton = _skeleton(model_class, config, dtype)
    expected = set(skeleton.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"pp_media: the stages' tensors do not match {model_class.__name__}'s state dict: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; was the pipeline built from "
            "another model class than the one exported?"
        )
    skeleton.save_pretrained(path, state_dict=state, max_shard_size=max_shard_size)


def save_pretrained(
    path: str | os.PathLike[str],
    stages: Sequence[nn.Module],
    *,
    model_class: type,
    config: Any,
    adapter: FamilyAdapter,
    tied: bool,
    send: bool,
    device: torch.device,
    max_shard_size: int | str,
) -> None:
    """Write the whole model to ``path`` from global rank 0; collective over the world.
    ``send``: whether this rank's stages go into the export (one data-parallel replica's
    ranks; the others only take part in gathering their shards)."""
    tensors = full_stage_tensors(stages)
    if tied:
        # The LM head copy is the embedding's value; the writer takes the embedding's.
        tensors.pop(f"{adapter.head_path}.weight", None)
    state = _gather_to_writer(tensors, send, device)
    error: list[str | None] = [None]
    if dist.get_rank() == WRITER:
        try:
            _write(Path(path), state, model_class, config, adapter, tied, max_shard_size)
        except ValueError as failure:
            error[0] = str(failure)
    # Every rank returns, or raises the writer's error, only once the files are complete.
    dist.broadcast_object_list(error, src=WRITER)
    if error[0] is not None:
        raise ValueError(error[0])
