"""Loading a checkpoint directory stage by stage: a meta-device skeleton, then only the
tensors this rank's stages hold.

The skeleton is the ``*ForConditionalGeneration`` model built on the meta device, so the
stage split costs no memory. ``load_stage_weights`` then materialises the stages' parameters
and buffers on the target device, reading only their tensors, and only from the safetensors
files that hold them. Checkpoint keys (often legacy names, ``model.layers.0...`` or
``language_model.model...``) are mapped to the model's names by transformers' own conversion
mapping, exactly as ``from_pretrained`` does, and keys it converts (per-expert MoE keys fused,
transposed, chunked) go through its own converters, one run per group of keys, on the stages'
groups only (``checkpoint_keys``); non-persistent buffers (rotary ``inv_freq``, position ids)
are recomputed by the model's own ``_init_weights``, as ``from_pretrained`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel, initialization
from transformers.core_model_loading import build_glob_alternation

from pp_media._hf.checkpoint_keys import ConverterGroup, Source, model_sources

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names (as ``get_slice(key).get_dtype()`` gives them) to torch dtypes.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------
# The skeleton
# ---------------------------------------------------------------------------------------------


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return None


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The checkpoint's own dtype, as ``from_pretrained(dtype="auto")`` finds it when the config
    names none: the index's ``dtype`` metadata, else the first floating tensor of the first file."""
    index = path / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        named = _as_dtype((data.get("metadata") or {}).get("dtype"))
        if named is not None:
            return named
        first = path / sorted(set(data["weight_map"].values()))[0]
    else:
        first = path / SINGLE_FILE
    if not first.is_file():
        return torch.get_default_dtype()
    with safetensors.safe_open(str(first), framework="pt") as handle:
        keys: list[str] = handle.keys()
        dtypes = [_SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype()) for key in keys]
    for found in dtypes:
        if found is not None and found.is_floating_point:
            return found
    return next((found for found in dtypes if found is not None), torch.float32)


#: Model types whose class no auto class maps, by class name (the omni thinker).
_UNMAPPED_CLASSES = {"qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}


def _model_factory(config: Any) -> Any:
    """``from_config`` of the first class that builds ``config``: the class of a model type no
    auto class maps, the image-text-to-text auto class, the legacy vision-to-sequence auto
    class, then ``config.architectures[0]``."""
    unmapped = _UNMAPPED_CLASSES.get(getattr(config, "model_type", None))
    if unmapped is not None:
        return getattr(transformers, unmapped)._from_config
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto_cls = getattr(transformers, auto_name, None)
        mapping = getattr(auto_cls, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return auto_cls.from_config
    for arch in getattr(config, "architectures", None) or ():
        model_cls = getattr(transformers, arch, None)
        if isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel):
            return model_cls._from_config
    raise ValueError(
        f"pp_media: cannot tell which model class builds a {type(config).__name__} "
        f"(model_type {getattr(config, 'model_type', None)!r}): it is not an "
        "AutoModelForImageTextToText model and its config names no transformers architecture."
    )


def meta_skeleton(path: Path, dtype: torch.dtype | None) -> PreTrainedModel:
    """The checkpoint's model built on the meta device, in ``dtype`` (default: the dtype
    ``from_pretrained`` would use, the config's, else the checkpoint's)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"pp_media: {str(path)!r} is not a Hugging Face checkpoint directory (no "
            "config.json); pass a save_pretrained output directory or a model instance."
        )
    config = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = _as_dtype(getattr(config, "dtype", None))
    if dtype is None:
        dtype = _checkpoint_dtype(path)
    factory = _model_factory(config)
    with torch.device("meta"):
        return factory(config, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The checkpoint's files and keys
# ---------------------------------------------------------------------------------------------


class _CheckpointFiles:
    """Which safetensors file holds each key; opens a file on first use, once; records every
    key whose tensor it reads."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path = path
        self._stack = stack
        self._handles: dict[str, Any] = {}
        self.read: list[str] = []
        index = path / INDEX_FILE
        single = path / SINGLE_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.file_of = dict(weight_map)
        elif single.is_file():
            handle = self.open(SINGLE_FILE)
            self.file_of = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise ValueError(
                f"pp_media: no safetensors weights in {str(path)!r}: expected {SINGLE_FILE} or "
                f"{INDEX_FILE} (save the model with save_pretrained(..., safe_serialization=True))."
            )

    def open(self, name: str) -> Any:
        if name not in self._handles:
            file = self.path / name
            if not file.is_file():
                raise ValueError(
                    f"pp_media: the checkpoint index of {str(self.path)!r} names {name}, which "
                    "does not exist; the checkpoint directory is incomplete."
                )
            self._handles[name] = self._stack.enter_context(
                safetensors.safe_open(str(file), framework="pt", device="cpu")
            )
        return self._handles[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.open(self.file_of[key]).get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        self.read.append(key)
        return self.open(self.file_of[key]).get_tensor(key)


# ---------------------------------------------------------------------------------------------
# The stages' tensors
# ---------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One parameter or buffer object of the stages, every module slot that holds it, and
    every name it goes by (in the stages and in the skeleton)."""

    tensor: torch.Tensor
    holders: list[tuple[nn.Module, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    persistent: bool = True


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _collect(stages: Sequence[nn.Module], kind: str) -> dict[int, _Slot]:
    """The stages' parameters (``kind="_parameters"``) or buffers (``"_buffers"``), each
    object once, with all its holders."""
    slots: dict[int, _Slot] = {}
    for stage in stages:
        for module_name, module in _walk(stage):
            for name, tensor in getattr(module, kind).items():
                if tensor is None:
                    continue
                slot = slots.setdefault(id(tensor), _Slot(tensor))
                slot.holders.append((module, name))
                full = f"{module_name}.{name}" if module_name else name
                if full not in slot.names:
                    slot.names.append(full)
                if kind == "_buffers" and name in module._non_persistent_buffers_set:
                    slot.persistent = False
    return slots


def _add_skeleton_holders(skeleton: nn.Module, slots: dict[int, _Slot], kind: str) -> None:
    """Also replace the tensors in the skeleton's own modules, and learn their other names
    (a tied LM head is also the embedding)."""
    for module_name, module in _walk(skeleton):
        for name, tensor in getattr(module, kind).items():
            slot = slots.get(id(tensor)) if tensor is not None else None
            if slot is None:
                continue
            if not any(holder is module and attr == name for holder, attr in slot.holders):
                slot.holders.append((module, name))
            full = f"{module_name}.{name}" if module_name else name
            if full not in slot.names:
                slot.names.append(full)


def _candidate_names(slot: _Slot, tied: dict[str, str]) -> list[str]:
    """Names to look the tensor up by: tie sources before tie targets (``from_pretrained``
    ties the LM head to the embedding, so the embedding's value wins), then the sources of
    any tied target."""
    ordered = sorted(slot.names, key=lambda name: name in tied)
    for name in list(ordered):
        source = tied.get(name)
        if source is not None and source not in ordered:
            ordered.append(source)
    return ordered


def _dtype_rule(
    skeleton: PreTrainedModel, dtype: torch.dtype | None
) -> Callable[[str, torch.Tensor], torch.dtype]:
    """``name, meta tensor -> dtype`` as ``from_pretrained`` picks it: ``keep_in_fp32``
    modules, else ``dtype`` for floating tensors when given, else the skeleton's dtype."""
    plan: dict[str, torch.dtype] = {}
    get_plan = getattr(skeleton, "_get_dtype_plan", None)
    if get_plan is not None:
        plan = get_plan(dtype if dtype is not None else skeleton.dtype) or {}
    pattern, group_to_glob, _ = build_glob_alternation(list(plan)) if plan else (None, {}, {})

    def rule(name: str, meta: torch.Tensor) -> torch.dtype:
        if pattern is not None:
            match = pattern.search(name)
            if match is not None and match.lastgroup is not None:
                return plan[group_to_glob[match.lastgroup]]
        if dtype is not None and meta.is_floating_point():
            return dtype
        return meta.dtype

    return rule


def _replace(slot: _Slot, value: torch.Tensor) -> None:
    """Put ``value`` in every slot that held the meta tensor: one object stays one object."""
    kind = "_parameters" if isinstance(slot.tensor, nn.Parameter) else "_buffers"
    for module, name in slot.holders:
        getattr(module, kind)[name] = value


def _owners(stages: Sequence[nn.Module], skeleton: PreTrainedModel) -> dict[int, PreTrainedModel]:
    """Module id -> its nearest ``PreTrainedModel`` ancestor (itself included) in the stages,
    the skeleton when there is none; that model's ``_init_weights`` handles the module."""
    owners: dict[int, PreTrainedModel] = {}

    def visit(module: nn.Module, owner: PreTrainedModel) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        owners.setdefault(id(module), owner)
        for child in module._modules.values():
            if child is not None:
                visit(child, owner)

    for stage in stages:
        visit(stage, skeleton)
    return owners


def _sentinel(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised-looking buffer: NaN (floats, complex: Llama4's rotary ``freqs_cis``)
    or the minimum (integers)."""
    if like.is_floating_point() or like.is_complex():
        return torch.full_like(like, math.nan, device=device)
    if like.dtype == torch.bool:
        return torch.zeros_like(like, device=device)
    return torch.full_like(like, torch.iinfo(like.dtype).min, device=device)


def _still_sentinel(value: torch.Tensor) -> bool:
    if value.numel() == 0 or value.dtype == torch.bool:
        return False
    if value.is_floating_point() or value.is_complex():
        return bool(value.isnan().any())
    return bool((value == torch.iinfo(value.dtype).min).all())


def _recompute_buffers(
    slots: list[_Slot], stages: Sequence[nn.Module], skeleton: PreTrainedModel, path: Path
) -> None:
    """Fill materialised buffers the checkpoint does not hold as ``from_pretrained`` does:
    the owning model's ``_init_weights`` on each module holding one (loaded parameters and
    buffers carry ``_is_hf_initialized``, so the init functions leave them alone)."""
    owners = _owners(stages, skeleton)
    modules: dict[int, nn.Module] = {}
    for slot in slots:
        for module, _ in slot.holders:
            if id(module) in owners:
                modules.setdefault(id(module), module)
    with torch.no_grad(), initialization.guard_torch_init_functions():
        for key, module in modules.items():
            owners[key]._init_weights(module)
    for slot in slots:
        module, name = slot.holders[0]
        if _still_sentinel(module._buffers[name]):
            raise RuntimeError(
                f"pp_media: buffer {slot.names[0]} is not in the checkpoint {str(path)!r} and "
                f"{type(module).__name__}'s _init_weights does not compute it; this family "
                "needs a model instance instead of a checkpoint directory."
            )


def _install(slot: _Slot, value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """``value`` on ``device`` in ``dtype`` as the slot's new Parameter or buffer."""
    value = value.to(device=device, dtype=dtype)
    if isinstance(slot.tensor, nn.Parameter):
        value = nn.Parameter(value, requires_grad=slot.tensor.requires_grad)
    value._is_hf_initialized = True  # type: ignore[attr-defined]
    _replace(slot, value)


def _check_local(
    groups: Iterable[ConverterGroup], held: dict[str, _Slot], model_names: set[str], path: Path
) -> None:
    """Refuse a converter run that also makes another rank's tensors: reading its keys would
    read that rank's weights (no converter in transformers' MoE mappings does this; each is
    local to one decoder layer)."""
    for group in groups:
        others = [name for name in group.targets if name in model_names and name not in held]
        if others:
            mine = [name for name in group.targets if name in held]
            raise NotImplementedError(
                f"pp_media: checkpoint key {group.all_keys[0]!r} in {str(path)!r} goes through "
                f"transformers' {group.describe()}, which makes {mine[0]} for these stages "
                f"together with {others[0]} of another stage; stage-wise loading runs a "
                "converter only when all it makes stays on one rank. Load the model with "
                "from_pretrained and pass the instance instead."
            )


def _load_group(
    group: ConverterGroup,
    wanted: dict[str, _Slot],
    files: _CheckpointFiles,
    skeleton: PreTrainedModel,
    device: torch.device,
    target_dtype: Callable[[str, torch.Tensor], torch.dtype],
    read_dtype: torch.dtype,
) -> None:
    """Run one converter group on its keys only, as ``from_pretrained`` does (sources read in
    the first target's dtype, on the device unless the converter forces the CPU), and put the
    tensors it makes into ``wanted`` (model name -> slot)."""
    read_device = torch.device("cpu") if group.converter.force_cpu else device
    made = group.run(
        lambda key: files.tensor(key).to(device=read_device, dtype=read_dtype), skeleton
    )
    for name, slot in wanted.items():
        value = made.get(name)
        if value is None or tuple(value.shape) != tuple(slot.tensor.shape):
            got = "nothing" if value is None else f"shape {list(value.shape)}"
            raise ValueError(
                f"pp_media: transformers' {group.describe()} made {got} for {name} from "
                f"checkpoint keys {group.all_keys[:4]} of {str(files.path)!r}, but "
                f"{slot.names[0]} has shape {list(slot.tensor.shape)}; the checkpoint does not "
                "match its config.json."
            )
        _install(slot, value, device, target_dtype(slot.names[0], slot.tensor))


def load_stage_weights(
    stages: Sequence[nn.Module],
    skeleton: PreTrainedModel,
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[str]:
    """Materialise the stages' meta parameters and buffers on ``device``, in place, from the
    checkpoint in ``path``, reading only their tensors and only the files holding them.

    Keys that transformers converts (fused MoE experts from per-expert keys, transposed or
    chunked tensors) are converted by transformers' own ``WeightConverter`` runs, grouped as
    ``from_pretrained`` groups them, each run on its keys only; a run that would also make
    another rank's tensors is refused. A parameter shared by several stages (a tied LM head
    and embedding on one rank) stays one Parameter. Floating parameters are cast to ``dtype``
    when given, else kept in the skeleton's dtype (what ``from_pretrained`` gives).
    Non-persistent buffers are recomputed. Returns the checkpoint keys read, in order.
    """
    path = Path(path)
    device = torch.device(device)
    model_names = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
    model_names.update(name for name, _ in skeleton.named_buffers(remove_duplicate=False))
    params = _collect(stages, "_parameters")
    buffers = _collect(stages, "_buffers")
    _add_skeleton_holders(skeleton, params, "_parameters")
    _add_skeleton_holders(skeleton, buffers, "_buffers")
    held = {name: slot for slot in [*params.values(), *buffers.values()] for name in slot.names}
    tied: dict[str, str] = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    target_dtype = _dtype_rule(skeleton, dtype)

    with ExitStack() as stack:
        files = _CheckpointFiles(path, stack)
        sources = model_sources(skeleton, files.file_of)

        def source_of(slot: _Slot) -> tuple[str, Source] | None:
            for name in _candidate_names(slot, tied):
                if name in sources:
                    return name, sources[name]
            return None

        plan: list[tuple[_Slot, str]] = []
        groups: dict[int, tuple[ConverterGroup, dict[str, _Slot]]] = {}
        missing: list[str] = []
        unfilled: list[_Slot] = []
        for slot in [*params.values(), *buffers.values()]:
            found = source_of(slot) if slot.persistent else None
            if found is None and isinstance(slot.tensor, nn.Parameter):
                missing.append(slot.names[0])
            elif found is None:
                unfilled.append(slot)
            elif isinstance(found[1], ConverterGroup):
                groups.setdefault(id(found[1]), (found[1], {}))[1][found[0]] = slot
            else:
                plan.append((slot, found[1]))
        if missing:
            raise ValueError(
                f"pp_media: the checkpoint {str(path)!r} lacks {len(missing)} tensor(s) these "
                f"stages need, e.g. {sorted(missing)[:5]}; it does not match its config.json."
            )
        _check_local((group for group, _ in groups.values()), held, model_names, path)
        for slot, key in sorted(plan, key=lambda item: files.file_of[item[1]]):
            shape = files.shape(key)
            if shape != tuple(slot.tensor.shape):
                raise ValueError(
                    f"pp_media: checkpoint tensor {key!r} in {str(path)!r} has shape "
                    f"{list(shape)}, but {slot.names[0]} has {list(slot.tensor.shape)}."
                )
            _install(slot, files.tensor(key), device, target_dtype(slot.names[0], slot.tensor))
        for group, wanted in groups.values():
            first = held.get(group.name) or next(iter(wanted.values()))
            read_dtype = target_dtype(group.name, first.tensor)
            _load_group(group, wanted, files, skeleton, device, target_dtype, read_dtype)
        read = list(files.read)

    for slot in unfilled:
        _replace(slot, _sentinel(slot.tensor, device))
    if unfilled:
        _recompute_buffers(unfilled, stages, skeleton, path)

    for stage in stages:
        for kind, named in (
            ("parameter", stage.named_parameters()),
            ("buffer", stage.named_buffers()),
        ):
            for name, tensor in named:
                if tensor.is_meta:
                    raise RuntimeError(
                        f"pp_media: {kind} {name} is still on the meta device after loading "
                        f"{str(path)!r}; stage-wise loading missed it."
                    )
    return read
