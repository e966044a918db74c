"""Stage-wise loading of the mixture-of-experts families: each stage runs transformers' own
weight converters (fused experts from per-expert keys, transposes, chunks, Ernie's
fuse-and-split, Inkling's interleave) on its own layers' checkpoint keys only.

Each tiny model (``pp_media/testing/_moe_survey.py``) is saved with ``save_pretrained`` (which
writes the legacy per-expert or transposed layout through the reverse conversions) and loaded
back stage by stage for a 2-stage split, each stage on a fresh meta skeleton as a rank does.
The stages are pruned by the generic ``prune_to_stage`` with a test-local adapter holding the
family's paths (the family adapters come separately); Llama4, whose text model sits under a
``*ForCausalLM`` with no ``model`` root, gets its parts by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from pp_media._hf.checkpoint import SINGLE_FILE, load_stage_weights, meta_skeleton
from pp_media._hf.families.base import FamilyAdapter
from pp_media._hf.pruning import prune_to_stage
from pp_media.testing import _moe_survey as moe

CPU = torch.device("cpu")
STAGE_LAYERS = ((0, 1), (2, 3))

#: model_type -> (vision paths, weight converters its save_pretrained output needs).
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "qwen3_vl_moe": (("model.visual",), "Transpose"),
    "qwen3_5_moe": (("model.visual",), "MergeModulelist+Concatenate"),
    "glm4v_moe": (("model.visual",), "MergeModulelist+Concatenate"),
    "ernie4_5_vl_moe": (
        ("model.vision_tower", "model.resampler_model"),
        "Transpose, Chunk, ErnieFuseAndSplitTextVisionExperts",
    ),
    "qwen3_omni_moe_thinker": (
        ("model.visual", "model.audio_tower"),
        "MergeModulelist+Concatenate",
    ),
    "minimax_m3_vl": (
        ("model.vision_tower", "model.multi_modal_projector"),
        "MergeModulelist+Concatenate, Concatenate",
    ),
    "inkling_mm_model": (("model.vision_tower", "model.audio_tower"), "Interleave+Chunk"),
    "aria": (("model.vision_tower", "model.multi_modal_projector"), "renames only"),
    "gemma4": (("model.vision_tower", "model.embed_vision"), "renames only"),
    "llama4": ((), "renames only"),
}


class _Paths(FamilyAdapter):
    """Just the paths ``prune_to_stage`` reads."""

    def __init__(self, vision_paths: tuple[str, ...]) -> None:
        self.vision_paths = vision_paths


def _llama4_stage(skeleton: nn.Module, stage: int) -> nn.Module:
    """Llama4's parts of one stage: vision and embeddings first, norm and head last."""
    text = skeleton.get_submodule("language_model.model")
    parts = [text.layers[i] for i in STAGE_LAYERS[stage]] + [text.rotary_emb]
    if stage == 0:
        parts += [skeleton.vision_model, skeleton.multi_modal_projector, text.embed_tokens]
    else:
        parts += [text.norm, skeleton.language_model.lm_head]
    return nn.ModuleList(parts)


def _stage(skeleton: nn.Module, model_type: str, stage: int) -> nn.Module:
    if model_type == "llama4":
        return _llama4_stage(skeleton, stage)
    adapter = _Paths(FAMILIES[model_type][0])
    last = len(STAGE_LAYERS) - 1
    return prune_to_stage(skeleton, adapter, STAGE_LAYERS[stage], stage == 0, stage == last)


class _RecordingHandle:
    """A safetensors handle that records every key whose tensor is read."""

    def __init__(self, handle: Any, read: list[str]) -> None:
        self._handle = handle
        self._read = read

    def __enter__(self) -> _RecordingHandle:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self._handle.__exit__(*exc)

    def get_tensor(self, key: str) -> torch.Tensor:
        self._read.append(key)
        return self._handle.get_tensor(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    real: Callable[..., Any] = safetensors.safe_open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda *a, **kw: _RecordingHandle(real(*a, **kw), read)
    )
    return read


def _loaded(skeleton: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The skeleton's tensors that loading materialised (the stage's, under model names)."""
    named = [
        *skeleton.named_parameters(remove_duplicate=False),
        *skeleton.named_buffers(remove_duplicate=False),
    ]
    return {name: tensor for name, tensor in named if not tensor.is_meta}


def _saved_keys(model: PreTrainedModel, names: set[str]) -> set[str]:
    """The checkpoint keys ``save_pretrained`` writes for these model tensors: transformers'
    reverse conversion of that part of the state dict."""
    state = {name: tensor for name, tensor in model.state_dict().items() if name in names}
    return set(revert_weight_conversion(model, state))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_moe_stages_load_only_their_own_keys(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = moe.tiny_model(model_type)
    with torch.no_grad():  # untrained norms are all ones; make every tensor distinct
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    model.save_pretrained(tmp_path)
    with safetensors.safe_open(str(tmp_path / SINGLE_FILE), framework="pt") as handle:
        all_keys = set(handle.keys())
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers(remove_duplicate=False))

    reads: list[list[str]] = []
    held: set[str] = set()
    for stage in range(len(STAGE_LAYERS)):
        skeleton = meta_skeleton(tmp_path, None)
        view = _stage(skeleton, model_type, stage)
        spied = _spy_reads(monkeypatch)
        read = load_stage_weights([view], skeleton, tmp_path, CPU, None)
        monkeypatch.undo()
        assert read == spied  # the record is what safetensors was asked for
        assert len(read) == len(set(read))  # each key once
        loaded = _loaded(skeleton)
        assert not any(t.is_meta for t in [*view.parameters(), *view.buffers()])
        for name, tensor in loaded.items():
            assert tensor.dtype == expected[name].dtype, name
            assert torch.equal(tensor, expected[name]), name
        # Exactly the keys save_pretrained wrote for this stage's tensors, no other.
        assert set(read) == _saved_keys(model, set(loaded)), model_type
        for key in read:  # and never another stage's experts
            layer = re.search(r"layers\.(\d+)\.", key)
            if "expert" in key:
                assert layer is not None and int(layer[1]) in STAGE_LAYERS[stage], key
        reads.append(read)
        held |= loaded.keys()
    assert held == expected.keys()
    assert set(reads[0]) | set(reads[1]) == all_keys


def test_converted_tensors_take_from_pretrained_dtypes(tmp_path: Path) -> None:
    """bf16 loading of Ernie: the converted router gates and routing biases stay fp32 (its
    ``_keep_in_fp32_modules_strict``), the fused experts are bf16, all as from_pretrained."""
    model = moe.tiny_model("ernie4_5_vl_moe")
    model.save_pretrained(tmp_path)
    reference = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    expected = dict(reference.named_parameters(remove_duplicate=False))
    expected.update(reference.named_buffers(remove_duplicate=False))
    skeleton = meta_skeleton(tmp_path, torch.bfloat16)
    view = _stage(skeleton, "ernie4_5_vl_moe", 1)
    load_stage_weights([view], skeleton, tmp_path, CPU, torch.bfloat16)
    mlp = view.model.language_model.layers[0].mlp  # layer 2
    assert mlp.text_moe.gate.weight.dtype == torch.float32
    assert mlp.vision_moe.experts.gate_up_proj.dtype == torch.bfloat16
    loaded = _loaded(skeleton)
    assert "model.language_model.layers.2.mlp.text_moe.gate.weight" in loaded
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
