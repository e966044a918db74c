"""Which checkpoint keys make each model tensor, as ``from_pretrained`` decides it.

A key is renamed by the model's conversion mapping (transformers' own, the one
``convert_and_load_state_dict_in_model`` uses). A key that hits a ``WeightConverter`` joins a
group, exactly as ``from_pretrained`` groups them: every key whose renamed name is the same
first target (one MoE layer's per-expert ``gate_proj``/``up_proj`` keys, in natural key order)
goes into one converter run, which makes that group's target tensors. A stage that holds a
group's targets runs that group, and reads only its keys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)


@dataclass
class ConverterGroup:
    """One run of a ``WeightConverter``: the checkpoint keys it reads, per source pattern in
    natural key order, and the model names it makes (``name``, transformers' ``layer_name``,
    is the first)."""

    name: str
    converter: WeightConverter
    keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """The model names the run makes, as transformers names them (the first target
        pattern in ``name`` replaced by each target pattern)."""
        first = self.converter.target_patterns[0]
        return [self.name.replace(first, target) for target in self.converter.target_patterns]

    @property
    def all_keys(self) -> list[str]:
        return [key for keys in self.keys.values() for key in keys]

    def describe(self) -> str:
        """The converter as a message names it: patterns and operations."""
        conv = self.converter
        return (
            f"{type(conv).__name__}({conv.source_patterns} -> {conv.target_patterns}, "
            f"operations {conv.operations})"
        )

    def run(
        self, read: Callable[[str], torch.Tensor], model: PreTrainedModel
    ) -> dict[str, torch.Tensor]:
        """Model name -> tensor, made by transformers' own ``WeightConverter.convert`` from the
        group's keys (read with ``read``, lazily, as the synchronous loader reads them)."""
        converter = copy.deepcopy(self.converter)
        for pattern, keys in self.keys.items():
            for key in keys:
                converter.add_tensor(self.name, key, pattern, lambda key=key: read(key))
        made = converter.convert(self.name, model=model, config=model.config)
        return {
            name: value[0] if isinstance(value, list) else value for name, value in made.items()
        }


#: Where a model name comes from: one checkpoint key, or a converter group.
Source = str | ConverterGroup


def model_sources(skeleton: PreTrainedModel, keys: Iterable[str]) -> dict[str, Source]:
    """Model name -> checkpoint key or converter group, renamed and grouped as
    ``convert_and_load_state_dict_in_model`` does. Keys that name nothing in the model are
    left out (``from_pretrained`` reports them as unexpected)."""
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: conv for conv in converters for pattern in conv.source_patterns}
    prefix = skeleton.base_model_prefix
    meta_state = skeleton.state_dict()
    sources: dict[str, Source] = {}
    groups: dict[str, ConverterGroup] = {}
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if pattern is None:
            sources.setdefault(renamed, key)
            continue
        if renamed not in meta_state:
            continue
        group = groups.get(renamed)
        if group is None:
            group = groups[renamed] = ConverterGroup(renamed, by_pattern[pattern])
            for target in group.targets:
                sources.setdefault(target, group)
        group.keys.setdefault(pattern, []).append(key)
    return sources
