"""Training checkpoints that resume: ``torch.distributed.checkpoint`` (DCP) over every rank.

Each rank hands DCP only its own stages' parameters and optimizer state (FSDP2 shards stay
DTensors), so each rank writes and reads only its shards, and DCP reshards on load. The keys are
the unsplit model's names, ``model.<parameter name>`` and ``optim.state.<parameter name>.<state>``
/ ``optim.param_groups.<parameter name>.<option>`` (torch's flattened optimizer state dict, made
for pipeline parallelism), plus ``step``; a tied LM head is stored once, under the input
embedding's name. No key says which stage or rank held a tensor, so a checkpoint loads into any
stage split, schedule and data-parallel size of the same model.

torch's ``get_*_state_dict`` / ``set_*_state_dict`` helpers see this rank's stages as one module
whose children are named by stage index; the index is stripped from every key on the way out and
put back on the way in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pp_media._hf.families.base import FamilyAdapter

MODEL, OPTIM, STEP = "model", "optim", "step"
_SECTIONS = ("state", "param_groups")
#: torch's flattened optimizer state dict: one key per parameter and state / option.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class _RankStages(nn.Module):
    """This rank's stages as one module for torch's state-dict helpers: child ``str(index)``
    is stage ``index``, so every key is ``<stage index>.<unsplit model name>``."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        for stage in sorted(stages, key=lambda s: s.stage_index):
            self.add_module(str(stage.stage_index), stage)


class _Names:
    """Between ``<stage index>.<name>`` keys and checkpoint keys (the unsplit model's names,
    with a tied LM head under the input embedding's name)."""

    def __init__(self, adapter: FamilyAdapter, tied: bool) -> None:
        self.head = f"{adapter.head_path}.weight"
        self.embed = f"{adapter.text_model_path}.embed_tokens.weight"
        self.tied = tied

    def param(self, name: str) -> str:
        """A parameter name, or a parameter name followed by ``.<state or option>``."""
        if self.tied and (name == self.head or name.startswith(self.head + ".")):
            return self.embed + name[len(self.head) :]
        return name

    def model_key(self, key: str) -> str:
        return self.param(key.split(".", 1)[1])

    def optim_key(self, key: str) -> str:
        section, rest = key.split(".", 1)
        return f"{section}.{self.param(rest.split('.', 1)[1])}"


def _canonical(local: Mapping[str, Any], rename: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``local`` re-keyed by checkpoint key (the first of several local keys for one checkpoint
    key wins: stage 0's embedding before a tied head), and each local key's checkpoint key."""
    by_key: dict[str, Any] = {}
    key_of: dict[str, str] = {}
    for key, value in local.items():
        canonical = rename(key)
        key_of[key] = canonical
        by_key.setdefault(canonical, value)
    return by_key, key_of


def _local_state(
    stages: Sequence[nn.Module],
    adapter: FamilyAdapter,
    tied: bool,
    optimizer: torch.optim.Optimizer | None,
) -> tuple[_RankStages, dict[str, Any], dict[str, str], dict[str, str]]:
    """The DCP state dict of this rank (tensors share storage with the parameters and the
    optimizer state) and, per section, each local key's checkpoint key."""
    module = _RankStages(stages)
    names = _Names(adapter, tied)
    model, model_keys = _canonical(get_model_state_dict(module), names.model_key)
    state: dict[str, Any] = {MODEL: model}
    optim_keys: dict[str, str] = {}
    if optimizer is not None:
        flat = get_optimizer_state_dict(module, optimizer, options=_OPTIM_OPTIONS)
        state[OPTIM], optim_keys = _canonical(flat, names.optim_key)
    return module, state, model_keys, optim_keys


def _checked_directory(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not (directory / ".metadata").is_file():
        raise ValueError(
            f"pp_media: {str(directory)!r} is not a checkpoint written by "
            "pipe.save_checkpoint (no .metadata file); pass the directory given to "
            "save_checkpoint (for a Hugging Face directory, build the pipeline from it instead)."
        )
    return directory


def _check_compatible(directory: Path, state: Mapping[str, Any]) -> None:
    """Refuse, before any rank reads a tensor, a checkpoint of another model (missing keys or
    other shapes) or one saved without the optimizer state that was asked for."""
    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    missing: list[str] = []
    shapes: list[str] = []
    for section in (MODEL, OPTIM):
        for key, value in state.get(section, {}).items():
            meta = stored.get(f"{section}.{key}")
            if meta is None:
                missing.append(f"{section}.{key}")
            elif isinstance(value, torch.Tensor) and tuple(getattr(meta, "size", ())) not in (
                (),
                tuple(value.shape),
            ):
                shapes.append(f"{key} {list(meta.size)} (model: {list(value.shape)})")
    if OPTIM in state and not any(key.startswith(f"{OPTIM}.") for key in stored):
        raise ValueError(
            f"pp_media: {str(directory)!r} holds no optimizer state (save_checkpoint was "
            "called without optimizer=); load it without optimizer= or save one with it."
        )
    if missing or shapes:
        raise ValueError(
            f"pp_media: {str(directory)!r} does not fit this model: {len(missing)} keys missing "
            f"(e.g. {missing[:3]}), {len(shapes)} shapes differ (e.g. {shapes[:3]}). A checkpoint "
            "loads into any stage split and data-parallel size, but only of the same model."
        )


def save_checkpoint(
    path: str | os.PathLike[str],
    stages: Sequence[nn.Module],
    adapter: FamilyAdapter,
    tied: bool,
    optimizer: torch.optim.Optimizer | None,
    step: int,
) -> None:
    """Write this rank's shards of the model (and optimizer) state and ``step`` to ``path``;
    collective over the whole world (every rank calls it with the same ``path``)."""
    _, state, _, _ = _local_state(stages, adapter, tied, optimizer)
    state[STEP] = torch.tensor(int(step), dtype=torch.int64)
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    stages: Sequence[nn.Module],
    adapter: FamilyAdapter,
    tied: bool,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """Read this rank's shards of a ``save_checkpoint`` directory into the stages (and the
    optimizer, whose state is created first if it has none); returns the saved step."""
    directory = _checked_directory(path)
    module, state, model_keys, optim_keys = _local_state(stages, adapter, tied, optimizer)
    _check_compatible(directory, state)
    state[STEP] = torch.zeros((), dtype=torch.int64)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(
        module, {key: state[MODEL][canonical] for key, canonical in model_keys.items()}
    )
    if optimizer is not None:
        flat = {key: state[OPTIM][canonical] for key, canonical in optim_keys.items()}
        set_optimizer_state_dict(module, optimizer, flat, options=_OPTIM_OPTIONS)
    return int(state[STEP])
