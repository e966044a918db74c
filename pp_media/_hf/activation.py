"""Activation checkpointing of every decoder layer a stage runs, without renaming anything.

torch's composable ``checkpoint`` (``torch.distributed._composable``) runs a module under
non-reentrant ``torch.utils.checkpoint`` through forward hooks: the layer keeps its place and its
parameter names (``model.language_model.layers.5.mlp.up_proj.weight``), unlike
``checkpoint_wrapper``, which inserts a ``_checkpoint_wrapped_module`` level. So optimizer state,
distributed checkpoints and the partition check still see the unsplit model's names, and FSDP2's
``fully_shard`` composes with it (applied after it, as torchtitan does).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.pipelining.schedules import (
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from pp_media._hf.families.base import FamilyAdapter

#: Schedules whose backward runs in two passes over the same graph (input gradients, later
#: weight gradients): the second pass would recompute each layer again, and the composable
#: checkpoint's recompute context can be entered only once (torch 2.13 raises AttributeError).
_TWO_PASS_BACKWARD = (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV)


def check_schedule(schedule_class: type) -> None:
    """Refuse activation checkpointing under the zero-bubble schedules, before building."""
    if issubclass(schedule_class, _TWO_PASS_BACKWARD):
        raise ValueError(
            f"pp_media: activation_checkpointing=True does not work with schedule "
            f"{schedule_class.__name__}: its backward runs in two passes (input, then weight "
            "gradients) and torch's checkpoint recomputes a layer only once. Use GPipe, 1F1B, "
            "Interleaved1F1B or LoopedBFS, or build without activation_checkpointing."
        )


def decoder_layers(stage: nn.Module, adapter: FamilyAdapter) -> list[nn.Module]:
    """The decoder layers ``stage`` runs, in order."""
    return list(stage.get_submodule(adapter.text_model_path).layers)


def checkpoint_decoder_layers(stages: Sequence[nn.Module], adapter: FamilyAdapter) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them; returns
    how many layers run checkpointed. A layer already checkpointed (a second pipeline built from
    the same model instance shares its layer modules) is left as it is."""
    count = 0
    for stage in stages:
        for layer in decoder_layers(stage, adapter):
            if checkpoint.state(layer) is None:
                checkpoint(layer)
            count += 1
    return count
