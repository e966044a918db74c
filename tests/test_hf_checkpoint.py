"""Stage-wise checkpoint loading: a meta skeleton, then each stage's own tensors only,
bit for bit what ``from_pretrained`` gives."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.core_model_loading import Chunk, WeightConverter

import pp_media._hf.checkpoint_keys as checkpoint_keys
from pp_media._hf.checkpoint import INDEX_FILE, SINGLE_FILE, load_stage_weights, meta_skeleton
from pp_media._hf.families import adapter_for
from pp_media._hf.partition import StageLayout, plan_stages
from pp_media._hf.pruning import prune_to_stage
from pp_media._hf.stage_module import VLMStage
from pp_media._hf.tied import unique_parameters

CPU = torch.device("cpu")


def _qwen_config(tied: bool) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config={
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 1000,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 10000.0,
            },
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=990,
        video_token_id=991,
        vision_start_token_id=992,
        vision_end_token_id=993,
        tie_word_embeddings=tied,
    )


def _llava_config() -> LlavaConfig:
    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 28,
            "patch_size": 14,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 1000,
            "tie_word_embeddings": True,
        },
        image_token_id=990,
        tie_word_embeddings=True,
    )


def _save(
    model_cls: type[PreTrainedModel],
    config: Any,
    path: Path,
    shard: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # untrained norms are all ones; make every tensor distinct
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    if dtype is not None:
        model = model.to(dtype)
    if shard is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    qwen = Qwen2VLForConditionalGeneration
    return {
        "qwen": _save(qwen, _qwen_config(False), root / "qwen"),
        "qwen_sharded": _save(qwen, _qwen_config(False), root / "qwen_sharded", "200KB"),
        "qwen_tied": _save(qwen, _qwen_config(True), root / "qwen_tied", "200KB"),
        "llava_tied": _save(LlavaForConditionalGeneration, _llava_config(), root / "llava_tied"),
        "qwen_bf16": _save(qwen, _qwen_config(False), root / "qwen_bf16", dtype=torch.bfloat16),
    }


def _reference(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _rank_stages(
    path: Path,
    schedule: str,
    pp_size: int,
    rank: int,
    dtype: torch.dtype | None = None,
    load: bool = True,
) -> tuple[PreTrainedModel, StageLayout, list[VLMStage]]:
    """This rank's stages over a fresh skeleton, as ``build_vlm_pipeline`` makes them."""
    skeleton = meta_skeleton(path, dtype)
    adapter = adapter_for(skeleton.config)
    n_layers = len(skeleton.get_submodule(adapter.text_model_path).layers)
    layout = plan_stages(schedule, pp_size, n_layers)
    last = layout.n_stages - 1
    views = [
        prune_to_stage(skeleton, adapter, layout.layers[s], s == 0, s == last)
        for s in range(layout.n_stages)
    ]
    stages = [
        VLMStage(
            views[s],
            adapter,
            skeleton.config,
            s,
            layout.n_stages,
            layout.layers[s],
            layout.first_layer(s),
        )
        for s in layout.stages_of(rank)
    ]
    if load:
        load_stage_weights(stages, skeleton, path, CPU, dtype)
    return skeleton, layout, stages


def _named_tensors(stage: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        *stage.named_parameters(remove_duplicate=False),
        *stage.named_buffers(remove_duplicate=False),
    ]


def test_meta_skeleton_is_the_checkpoint_model_on_meta(ckpts: dict[str, Path]) -> None:
    skeleton = meta_skeleton(ckpts["qwen"], None)
    assert isinstance(skeleton, Qwen2VLForConditionalGeneration)
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert skeleton.dtype == torch.float32
    assert meta_skeleton(ckpts["qwen"], torch.bfloat16).dtype == torch.bfloat16
    assert meta_skeleton(ckpts["qwen_bf16"], None).dtype == torch.bfloat16
    llava = meta_skeleton(ckpts["llava_tied"], None)
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight


def test_meta_skeleton_needs_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json") as info:
        meta_skeleton(tmp_path, None)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
@pytest.mark.parametrize("name", ["qwen", "qwen_sharded", "qwen_tied", "llava_tied"])
def test_stage_weights_equal_from_pretrained(
    ckpts: dict[str, Path], name: str, schedule: str
) -> None:
    reference = _reference(ckpts[name])
    full_params = dict(
        AutoModelForImageTextToText.from_pretrained(ckpts[name]).named_parameters(
            remove_duplicate=False
        )
    )
    full_bytes = sum(p.nbytes for p in {id(p): p for p in full_params.values()}.values())
    held: set[str] = set()
    for rank in range(2):
        _, _, stages = _rank_stages(ckpts[name], schedule, 2, rank)
        for stage in stages:
            for tensor_name, tensor in _named_tensors(stage):
                expected = reference[tensor_name]
                assert not tensor.is_meta, tensor_name
                assert tensor.device == CPU and tensor.dtype == expected.dtype, tensor_name
                assert torch.equal(tensor, expected), tensor_name
            for param_name, param in stage.named_parameters(remove_duplicate=False):
                assert isinstance(param, nn.Parameter) and param.requires_grad, param_name
                held.add(param_name)
            own = dict(stage.named_parameters())
            stage_bytes = sum(p.nbytes for p in stage.parameters())
            assert stage_bytes == sum(full_params[n].nbytes for n in own)
            assert stage_bytes < full_bytes
    assert held >= full_params.keys()


@pytest.mark.parametrize("name", ["qwen_tied", "llava_tied"])
def test_v_layout_keeps_tied_head_and_embedding_one_parameter(
    ckpts: dict[str, Path], name: str
) -> None:
    skeleton, layout, stages = _rank_stages(ckpts[name], "ZBVZeroBubble", 2, 0)
    assert layout.stages_of(0) == (0, 3)
    first, last = stages
    embed = first.get_submodule(first.adapter.text_model_path).embed_tokens.weight
    head = last.get_submodule(last.adapter.head_path).weight
    assert head is embed
    assert not embed.is_meta and embed.requires_grad
    assert skeleton.lm_head.weight is embed  # the skeleton's own slots are updated too
    assert (
        len(unique_parameters(stages))
        == len(list(first.parameters())) + len(list(last.parameters())) - 1
    )
    assert torch.equal(embed, _reference(ckpts[name])["lm_head.weight"])


def test_tied_head_absent_from_checkpoint_is_read_from_the_embedding(
    ckpts: dict[str, Path],
) -> None:
    path = ckpts["llava_tied"]
    with safetensors.safe_open(str(path / SINGLE_FILE), framework="pt") as handle:
        keys = set(handle.keys())
    assert not any("lm_head" in key for key in keys)  # transformers drops the tied head
    assert "language_model.model.embed_tokens.weight" in keys  # and saves legacy names
    _, _, (last,) = _rank_stages(path, "1F1B", 2, 1)
    with safetensors.safe_open(str(path / SINGLE_FILE), framework="pt") as handle:
        embed = handle.get_tensor("language_model.model.embed_tokens.weight")
    assert torch.equal(last.lm_head.weight, embed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_cast_matches_from_pretrained(ckpts: dict[str, Path], dtype: torch.dtype) -> None:
    reference = _reference(ckpts["qwen"], dtype)
    for rank in range(2):
        _, _, stages = _rank_stages(ckpts["qwen"], "1F1B", 2, rank, dtype)
        for tensor_name, tensor in _named_tensors(stages[0]):
            assert tensor.dtype == reference[tensor_name].dtype, tensor_name
            assert torch.equal(tensor, reference[tensor_name]), tensor_name


def test_default_dtype_follows_the_checkpoint(ckpts: dict[str, Path]) -> None:
    reference = _reference(ckpts["qwen_bf16"])
    _, _, (stage,) = _rank_stages(ckpts["qwen_bf16"], "1F1B", 2, 0)
    assert stage.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    for tensor_name, tensor in _named_tensors(stage):
        assert tensor.dtype == reference[tensor_name].dtype, tensor_name
        assert torch.equal(tensor, reference[tensor_name]), tensor_name


def test_config_without_dtype_uses_the_checkpoint_dtype(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "no_dtype"
    shutil.copytree(ckpts["qwen_bf16"], path)
    config = json.loads((path / "config.json").read_text())
    for part in (config, config["text_config"], config["vision_config"]):
        part.pop("dtype", None)
        part.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    reference = _reference(path)
    assert reference["lm_head.weight"].dtype == torch.bfloat16
    _, _, (stage,) = _rank_stages(path, "1F1B", 2, 1)
    for tensor_name, tensor in _named_tensors(stage):
        assert tensor.dtype == reference[tensor_name].dtype, tensor_name
        assert torch.equal(tensor, reference[tensor_name]), tensor_name


def _spy_opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real: Callable[..., Any] = safetensors.safe_open

    def spy(filename: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(filename).name)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return opened


def test_sharded_checkpoint_opens_only_the_needed_files(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ckpts["qwen_sharded"]
    weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    # GPipe over 3 ranks: layers [0], [1, 2], [3]; rank 1 holds only middle decoder layers.
    skeleton, layout, stages = _rank_stages(path, "GPipe", 3, 1, load=False)
    assert layout.layers[1] == (1, 2)
    needed = {
        file
        for key, file in weight_map.items()
        if key.startswith(("model.layers.1.", "model.layers.2."))
    }
    assert needed < set(weight_map.values())
    opened = _spy_opened(monkeypatch)
    load_stage_weights(stages, skeleton, path, CPU, None)
    assert sorted(opened) == sorted(needed)  # each needed file once, no other
    assert weight_map["model.embed_tokens.weight"] not in opened
    assert weight_map["visual.patch_embed.proj.weight"] not in opened


def test_missing_weights_file_raises(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "no_weights"
    shutil.copytree(ckpts["qwen"], path)
    (path / SINGLE_FILE).unlink()
    skeleton, _, stages = _rank_stages(path, "1F1B", 2, 0, load=False)
    with pytest.raises(ValueError, match="no safetensors weights") as info:
        load_stage_weights(stages, skeleton, path, CPU, None)
    assert str(path) in str(info.value)


def test_missing_shard_raises(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "no_shard"
    shutil.copytree(ckpts["qwen_sharded"], path)
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    shard = weight_map["model.layers.0.mlp.up_proj.weight"]
    (path / shard).unlink()
    skeleton, _, stages = _rank_stages(path, "1F1B", 2, 0, load=False)
    with pytest.raises(ValueError, match=shard):
        load_stage_weights(stages, skeleton, path, CPU, None)


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    with safetensors.safe_open(str(dst / SINGLE_FILE), framework="pt") as handle:
        keys: list[str] = handle.keys()
        tensors = {key: handle.get_tensor(key) for key in keys}
    edit(tensors)
    save_file(tensors, str(dst / SINGLE_FILE), metadata={"format": "pt"})
    return dst


def test_missing_key_raises_with_names(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = _rewrite(
        ckpts["qwen"],
        tmp_path / "missing_key",
        lambda tensors: tensors.pop("model.layers.3.mlp.up_proj.weight"),
    )
    skeleton, _, (stage,) = _rank_stages(path, "1F1B", 2, 0, load=False)
    load_stage_weights([stage], skeleton, path, CPU, None)  # layer 3 is not stage 0's
    skeleton, _, (stage,) = _rank_stages(path, "1F1B", 2, 1, load=False)
    expected = re.escape("model.language_model.layers.3.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=expected) as info:
        load_stage_weights([stage], skeleton, path, CPU, None)
    assert str(path) in str(info.value)


def test_persistent_buffer_is_loaded_by_its_renamed_key(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    scale = torch.arange(64, dtype=torch.float32)
    path = _rewrite(
        ckpts["qwen"],
        tmp_path / "buffer",
        lambda tensors: tensors.__setitem__("model.norm.scale", scale),
    )
    skeleton, _, (stage,) = _rank_stages(path, "1F1B", 2, 1, load=False)
    norm = skeleton.model.language_model.norm
    norm.register_buffer("scale", torch.empty(64, device="meta"))  # persistent
    load_stage_weights([stage], skeleton, path, CPU, None)
    assert torch.equal(stage.model.language_model.norm.scale, scale)


def _with_converter(monkeypatch: pytest.MonkeyPatch, source: str, targets: list[str]) -> None:
    """Add a ``Chunk`` converter to the conversion mapping stage-wise loading uses."""
    real = checkpoint_keys.get_model_conversion_mapping
    converter = WeightConverter(
        source_patterns=[source], target_patterns=targets, operations=[Chunk(dim=0)]
    )
    monkeypatch.setattr(
        checkpoint_keys, "get_model_conversion_mapping", lambda model: [*real(model), converter]
    )


def test_layer_local_converter_runs_on_the_stage_keys_only(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_converter(monkeypatch, "mlp.gate_proj.weight", ["mlp.gate_proj.weight"])
    skeleton, _, stages = _rank_stages(ckpts["qwen"], "1F1B", 2, 1, load=False)
    read = load_stage_weights(stages, skeleton, ckpts["qwen"], CPU, None)
    assert "model.layers.2.mlp.gate_proj.weight" in read
    assert all(
        key.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head."))
        for key in read
    )
    reference = _reference(ckpts["qwen"])
    for tensor_name, tensor in _named_tensors(stages[0]):
        assert torch.equal(tensor, reference[tensor_name]), tensor_name


def test_converter_across_stages_raises_not_implemented(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    norms = ("model.layers.1.input_layernorm.weight", "model.layers.2.input_layernorm.weight")

    def fuse(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.fused_norms.weight"] = torch.cat([tensors.pop(key) for key in norms])

    path = _rewrite(ckpts["qwen"], tmp_path / "fused", fuse)
    targets = ["layers.1.input_layernorm.weight", "layers.2.input_layernorm.weight"]
    _with_converter(monkeypatch, "fused_norms.weight", targets)
    skeleton, _, stages = _rank_stages(path, "1F1B", 2, 1, load=False)  # layers 2, 3
    expected = (
        r"checkpoint key 'model\.fused_norms\.weight' .* goes through transformers' "
        r"WeightConverter\(\['fused_norms\.weight'\] .* \[Chunk\(dim=0\)\]\), which makes "
        r"model\.language_model\.layers\.2\.input_layernorm\.weight for these stages together "
        r"with model\.language_model\.layers\.1\.input_layernorm\.weight of another stage.*"
        r"Load the model with from_pretrained and pass the instance instead\."
    )
    with pytest.raises(NotImplementedError, match=expected):
        load_stage_weights(stages, skeleton, path, CPU, None)
    # ZBV puts layers 1 and 2 on rank 1: the converter runs there, on its key only.
    skeleton, layout, stages = _rank_stages(path, "ZBVZeroBubble", 2, 1, load=False)
    assert [layout.layers[s] for s in layout.stages_of(1)] == [(1,), (2,)]
    read = load_stage_weights(stages, skeleton, path, CPU, None)
    assert read.count("model.fused_norms.weight") == 1
    reference = _reference(ckpts["qwen"])
    for stage in stages:
        for tensor_name, tensor in _named_tensors(stage):
            assert torch.equal(tensor, reference[tensor_name]), tensor_name


def test_buffer_init_weights_cannot_compute_raises(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PreTrainedModel, "_init_weights", lambda self, module: None)
    skeleton, _, stages = _rank_stages(ckpts["qwen"], "1F1B", 2, 1, load=False)
    with pytest.raises(RuntimeError, match=r"rotary_emb\.inv_freq"):
        load_stage_weights(stages, skeleton, ckpts["qwen"], CPU, None)
