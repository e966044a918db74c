"""A stage's view of a Hugging Face model: the same modules, only this stage's parts.

Containers on the way to the kept parts are shallow copies, so the source model is not changed
and parameter names stay the model's own (``model.language_model.layers.5.mlp.up_proj.weight``):
gradients, optimizer state and checkpoint keys line up with the unsplit model by name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import nn

from pp_media._hf.families.base import FamilyAdapter


class GlobalIndexModuleList(nn.ModuleList):
    """A ModuleList of some decoder layers that keeps their global indices as names.

    ``layers.5`` stays ``layers.5`` on the stage that holds layers 4..7; iteration, ``len`` and
    slicing see only the held layers, in order, as the text model's forward expects.
    """

    def __init__(self, layers: Iterable[tuple[int, nn.Module]]) -> None:
        super().__init__()
        for index, layer in layers:
            self.add_module(str(index), layer)

    def __getitem__(self, idx: int | slice) -> Any:
        held = list(self._modules.values())
        if isinstance(idx, slice):
            return nn.ModuleList(held[idx])
        return held[idx]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(list(self._modules.values()))


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def _drop(root: nn.Module, model: nn.Module, path: str) -> None:
    """Set the module at ``path`` to None in the view ``root`` of ``model``, shallow-copying
    every container on the way that the view still shares with ``model``."""
    *parents, name = path.split(".")
    view, original = root, model
    for part in parents:
        child = view._modules.get(part)
        if child is None:  # the whole subtree is already gone from this stage
            return
        original = original.get_submodule(part)
        if child is original:
            child = _shallow(child)
            view._modules[part] = child
        view = child
    if name in view._modules:
        view._modules[name] = None


def _parent_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def prune_to_stage(
    model: nn.Module,
    adapter: FamilyAdapter,
    layers: Sequence[int],
    is_first: bool,
    is_last: bool,
) -> nn.Module:
    """A shallow view of ``model`` (a ``*ForConditionalGeneration``) holding one stage's parts.

    Kept: the text model with ``layers`` (and its rotary embedding; its config as the
    adapter's ``stage_config`` cuts it), plus on the first stage the token embeddings, the
    vision parts and the adapter's ``stage0_only_paths``, and on the last the final norm and
    LM head. Any
    other child along those paths is dropped; ``check_partition`` verifies that the stages
    together hold every parameter exactly once.
    """
    root = _shallow(model)
    base_path = adapter.base_model_path
    base = _shallow(model.get_submodule(base_path))
    root._modules[base_path] = base
    first_only = (*adapter.vision_paths, *adapter.stage0_only_paths)
    keep = {adapter.text_model_path, *(first_only if is_first else ())}
    base._modules = {
        name: module for name, module in base._modules.items() if f"{base_path}.{name}" in keep
    }
    # Parameters of the base model itself (LLaVA-NeXT's image_newline) go where a path names them.
    base._parameters = {
        name: param for name, param in base._parameters.items() if f"{base_path}.{name}" in keep
    }
    text_parent, text_name = _parent_and_name(root, adapter.text_model_path)
    text = _shallow(model.get_submodule(adapter.text_model_path))
    text_parent._modules[text_name] = text
    text.config = adapter.stage_config(text.config, tuple(layers))
    all_layers = text.layers
    text._modules["layers"] = GlobalIndexModuleList((i, all_layers[i]) for i in layers)
    if not is_first:
        text._modules["embed_tokens"] = None
        for path in adapter.stage0_only_paths:
            _drop(root, model, path)
    if not is_last:
        text._modules["norm"] = nn.Identity()
    head_parent, head_name = _parent_and_name(root, adapter.head_path)
    root._modules = {
        name: module
        for name, module in root._modules.items()
        if name == base_path or (is_last and root is head_parent and name == head_name)
    }
    return root
