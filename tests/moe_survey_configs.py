"""Tiny random configs and image batches of the mixture-of-experts VLM families (issue 13).

Test-side on purpose: the family fixtures (``pp_media.testing``) can absorb them once the MoE
adapters exist. Every config has 4 experts, top-k 2, text width 64 and 4 decoder layers, so
a forward and backward with router logits takes well under a second on one CPU core.
``tiny_batch`` builds image tensors in the layout the family's processor emits: the image
processors of minimax_m3_vl, llama4 and inkling need torchvision, which does not import here
(the others' PIL processors build and emit these layouts, see the survey).
``docs/moe_survey.md`` says what each family does. Every family here builds; Llama4's
``ForConditionalGeneration.forward`` fails in transformers 5.24 (the survey runs its parts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

VOCAB = 1000
IMAGE, VIDEO, START, END = 990, 991, 992, 993
EXPERTS, TOP_K, LAYERS = 4, 2, 4
SEQ_LEN = 24
#: One pixel row per image (Llama4, Aria): 56x56 images, 16 patches of 14, 4 placeholders each
#: (Llama4: pixel shuffle 0.5; Aria: 4 projector queries).
ROW_IMAGE_SIZE, ROW_TOKENS = 56, 4
GEMMA4_PATCH = 4
#: Spread of the routing biases: scores are sigmoid(logits) ~ 0.5 +- 0.04 at initialisation.
ROUTING_BIAS_STD = 0.05
#: Images per sample of the survey batch (the image-less sample checks text-only rows).
IMAGES_PER_SAMPLE = (1, 2, 0, 1)
#: ``(t, h, w)`` patch grids of those images, in batch order (merge 2: h * w / 4 tokens each).
GRIDS = ((1, 4, 4), (1, 2, 4), (1, 4, 2), (1, 2, 2))

_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": LAYERS,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
_MROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [2, 3, 3],
    "mrope_interleaved": True,
}
_QWEN3_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,
}
_QWEN_TOKENS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": START,
    "vision_end_token_id": END,
    "tie_word_embeddings": False,
}


def _qwen3_vl_moe() -> Any:
    import transformers

    text = {
        **_TEXT,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": 32,
        "rope_parameters": _MROPE,
        "router_aux_loss_coef": 0.01,
    }
    vision = {**_QWEN3_VISION, "deepstack_visual_indexes": [0, 1]}
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_QWEN_TOKENS)


def _qwen3_5_moe() -> Any:
    import transformers

    text = {
        **_TEXT,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "layer_types": ["linear_attention", "full_attention"] * (LAYERS // 2),
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "rope_parameters": {**_MROPE, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]},
        "router_aux_loss_coef": 0.01,
    }
    return transformers.Qwen3_5MoeConfig(
        text_config=text, vision_config=dict(_QWEN3_VISION), **_QWEN_TOKENS
    )


def _glm4v_moe() -> Any:
    import transformers

    text = {
        **_TEXT,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5,
        },
        "router_aux_loss_coef": 0.01,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "image_size": 56,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return transformers.Glm4vMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        image_start_token_id=START,
        image_end_token_id=END,
        tie_word_embeddings=False,
    )


def _ernie4_5_vl_moe() -> Any:
    import transformers

    text = {
        **_TEXT,
        "moe_num_experts": EXPERTS,
        "moe_k": TOP_K,
        "moe_intermediate_size": [32, 16],
        "moe_num_shared_experts": 1,
        "mlp_layer_types": ["dense"] + ["sparse"] * (LAYERS - 1),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [3, 3, 2],
        },
        "router_aux_loss_coef": 0.01,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_merge_size": 2,
    }
    return transformers.Ernie4_5_VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        image_start_token_id=START,
        image_end_token_id=END,
        tie_word_embeddings=False,
    )


def _qwen3_omni_moe_thinker() -> Any:
    import transformers

    text = {
        **_TEXT,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": 32,
        "rope_parameters": _MROPE,
        "router_aux_loss_coef": 0.01,
    }
    vision = {**_QWEN3_VISION, "deepstack_visual_indexes": [0, 1]}
    audio = {
        "num_mel_bins": 16,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "d_model": 16,
        "output_dim": 64,
        "downsample_hidden_size": 8,
    }
    return transformers.Qwen3OmniMoeThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
        audio_token_id=989,
        audio_start_token_id=988,
        tie_word_embeddings=False,
    )


def _minimax_m3_vl() -> Any:
    import transformers

    text = {
        **_TEXT,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "intermediate_size": 32,
        "shared_intermediate_size": 32,
        "dense_intermediate_size": 96,
        "mlp_layer_types": ["dense"] + ["sparse"] * (LAYERS - 1),
        "rotary_dim": 8,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_block_size": 8,
        "index_topk_blocks": 2,
        "router_aux_loss_coef": 0.01,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    return transformers.MiniMaxM3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        projector_hidden_size=64,
        merged_hidden_size=64 * 4,
        tie_word_embeddings=False,
    )


def _llama4() -> Any:
    import transformers

    text = {
        **_TEXT,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "intermediate_size": 32,
        "intermediate_size_mlp": 96,
        "interleave_moe_layer_step": 1,
        "attention_chunk_size": 16,
        "no_rope_layer_interval": 2,
        "router_aux_loss_coef": 0.01,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": ROW_IMAGE_SIZE,
        "patch_size": 14,
        "vision_output_dim": 64,
        "projector_input_dim": 64,
        "projector_output_dim": 64,
        "pixel_shuffle_ratio": 0.5,
    }
    return transformers.Llama4Config(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE,
        boi_token_index=START,
        eoi_token_index=END,
        tie_word_embeddings=False,
    )


def _aria() -> Any:
    import transformers

    text = {
        **_TEXT,
        "moe_num_experts": EXPERTS,
        "moe_topk": TOP_K,
        "moe_num_shared_experts": 1,
        "intermediate_size": 32,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": ROW_IMAGE_SIZE,
        "patch_size": 14,
    }
    patches = (ROW_IMAGE_SIZE // 14) ** 2
    return transformers.AriaConfig(
        text_config=text,
        vision_config=vision,
        projector_patch_to_query_dict={patches: ROW_TOKENS},
        image_token_index=IMAGE,
        tie_word_embeddings=False,
    )


def _inkling() -> Any:
    import transformers

    text = {
        **_TEXT,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": 32,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 16,
        "sliding_window_size": 8,
        "rel_extent": 32,
        "d_rel": 4,
        "layer_types": ["hybrid_sliding", "hybrid"] * (LAYERS // 2),
        "mlp_layer_types": ["sparse"] * LAYERS,
    }
    # n_layers >= the encoder's scale count (4 at patch 4), else it imports scipy.
    vision = {"text_hidden_size": 64, "patch_size": 4, "temporal_patch_size": 2, "n_layers": 4}
    audio = {"text_hidden_size": 64, "n_mel_bins": 8}
    return transformers.InklingConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_id=IMAGE,
        image_bos_token_id=START,
        audio_token_id=989,
        audio_bos_token_id=988,
    )


def _gemma4() -> Any:
    import transformers

    text = {
        **_TEXT,
        "enable_moe_block": True,
        "num_experts": EXPERTS,
        "top_k_experts": TOP_K,
        "moe_intermediate_size": 32,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": VOCAB,
        "num_kv_shared_layers": 2,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2),
        "global_head_dim": 32,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "patch_size": GEMMA4_PATCH,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
    }
    return transformers.Gemma4Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        boi_token_id=START,
        eoi_token_id=END,
        tie_word_embeddings=False,
    )


#: model_type -> config builder, for the families whose tiny model builds and trains on CPU.
BUILDERS: dict[str, Callable[[], Any]] = {
    "qwen3_vl_moe": _qwen3_vl_moe,
    "qwen3_5_moe": _qwen3_5_moe,
    "glm4v_moe": _glm4v_moe,
    "ernie4_5_vl_moe": _ernie4_5_vl_moe,
    "qwen3_omni_moe_thinker": _qwen3_omni_moe_thinker,
    "minimax_m3_vl": _minimax_m3_vl,
    "llama4": _llama4,
    "aria": _aria,
    "inkling_mm_model": _inkling,
    "gemma4": _gemma4,
}

#: Families whose ``*ForConditionalGeneration`` adds ``router_aux_loss_coef * aux`` to its loss
#: when called with ``output_router_logits=True`` (transformers' ``load_balancing_loss_func``).
AUX_LOSS_FAMILIES = (
    "qwen3_vl_moe",
    "qwen3_5_moe",
    "glm4v_moe",
    "ernie4_5_vl_moe",
    "qwen3_omni_moe_thinker",
    "minimax_m3_vl",
)
#: The module whose output transformers records as ``router_logits``, and the output index:
#: what ``OutputRecorder`` in each family's ``_can_record_outputs`` names.
ROUTER_OUTPUTS = {
    "qwen3_vl_moe": ("Qwen3VLMoeTextTopKRouter", 0),
    "qwen3_5_moe": ("Qwen3_5MoeTopKRouter", 0),
    "glm4v_moe": ("Glm4vMoeTextTopkRouter", 0),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeMoeBlock", 1),
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerTextTopKRouter", 0),
    "minimax_m3_vl": ("MiniMaxM3VLTopKRouter", 0),
    "llama4": ("Llama4Router", 1),
    "aria": ("AriaTextTopKRouter", 0),
    "inkling_mm_model": ("InklingTopkRouter", 0),
    "gemma4": ("Gemma4TextRouter", 0),
}
#: transformers module holding each aux-loss family's ``load_balancing_loss_func``.
LOSS_MODULES = {
    "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_5_moe": "qwen3_5_moe",
    "glm4v_moe": "glm4v_moe",
    "ernie4_5_vl_moe": "ernie4_5_vl_moe",
    "qwen3_omni_moe_thinker": "qwen3_omni_moe",
    "minimax_m3_vl": "minimax_m3_vl",
}


def load_balancing_loss_func(model_type: str) -> Callable[..., Any]:
    """transformers' own ``load_balancing_loss_func`` of an aux-loss family."""
    import importlib

    name = LOSS_MODULES[model_type]
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    return module.load_balancing_loss_func


def routers(model: Any, model_type: str) -> tuple[list[Any], int]:
    """The modules recorded as ``router_logits`` (decoder layers in order) and the index."""
    cls, index = ROUTER_OUTPUTS[model_type]
    found = [m for name, m in model.named_modules() if type(m).__name__ == cls]
    return found, index


#: Classes that ``AutoModelForImageTextToText`` does not map from the config's model_type.
_CLASSES = {"qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}


def tiny_config(model_type: str) -> Any:
    """The tiny config of ``model_type`` (see ``BUILDERS``)."""
    return BUILDERS[model_type]()


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random ``*ForConditionalGeneration`` of ``model_type`` in fp32, in train mode."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if model_type in _CLASSES:
        model = getattr(transformers, _CLASSES[model_type])._from_config(
            config, dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _perturb_routing_biases(model)
    return model.train()


def _perturb_routing_biases(model: Any) -> None:
    """Random ``e_score_correction_bias`` (zeros at initialisation, trained in checkpoints), so
    that the experts glm4v_moe, minimax_m3_vl, ernie4_5_vl_moe and inkling actually route to
    differ from the top-k of ``softmax(logits)`` that transformers' loss counts."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(ROUTING_BIAS_STD * noise)


def _texts(
    runs: Sequence[Sequence[int]], pad: Sequence[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and image-token mask: each sample is its image runs
    (``START``, placeholders, ``END``) then random text, right-padded by ``pad[i]`` tokens."""
    ids = torch.randint(3, IMAGE - 10, (len(runs), SEQ_LEN), generator=generator)
    mask = torch.ones_like(ids)
    image = torch.zeros_like(ids, dtype=torch.bool)
    for row, (sample_runs, n_pad) in enumerate(zip(runs, pad, strict=True)):
        at = 1
        for n in sample_runs:
            ids[row, at] = START
            ids[row, at + 1 : at + 1 + n] = IMAGE
            image[row, at + 1 : at + 1 + n] = True
            ids[row, at + 1 + n] = END
            at += n + 3
        if n_pad:
            ids[row, SEQ_LEN - n_pad :] = 0
            mask[row, SEQ_LEN - n_pad :] = 0
    return ids, mask, image


def _split_runs(tokens: Sequence[int]) -> list[list[int]]:
    runs, it = [], iter(tokens)
    for count in IMAGES_PER_SAMPLE:
        runs.append([next(it) for _ in range(count)])
    return runs


def _qwen_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = torch.tensor(GRIDS)
    tokens = [int(t * h * w) // merge**2 for t, h, w in GRIDS]
    ids, mask, image = _texts(_split_runs(tokens), pad, generator)
    temporal = getattr(vision, "temporal_patch_size", 1)
    channels = getattr(vision, "in_channels", None) or vision.num_channels
    width = channels * temporal * vision.patch_size**2
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": image.long(),
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), width, generator=generator),
        "image_grid_thw": grid,
    }


def _ernie_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    """Qwen-style flat patches without a temporal patch, plus ``moe_mm_token_type_ids``: the
    image placeholders and their start/end tokens go to the vision experts."""
    batch = _qwen_batch(config, generator, pad)
    ids = batch["input_ids"]
    batch["moe_mm_token_type_ids"] = ((ids == IMAGE) | (ids == START) | (ids == END)).long()
    return batch


def _omni_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    """Qwen3-VL's layout; the thinker derives M-RoPE from the token ids (no token types)."""
    batch = _qwen_batch(config, generator, pad)
    del batch["mm_token_type_ids"]
    return batch


def _rows_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    """One ``[3, S, S]`` row of ``pixel_values`` per image, ``ROW_TOKENS`` placeholders each."""
    n = sum(IMAGES_PER_SAMPLE)
    ids, mask, _ = _texts(_split_runs([ROW_TOKENS] * n), pad, generator)
    pixels = torch.randn(n, 3, ROW_IMAGE_SIZE, ROW_IMAGE_SIZE, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _aria_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    batch = _rows_batch(config, generator, pad)
    n = batch["pixel_values"].shape[0]
    batch["pixel_mask"] = torch.ones(n, ROW_IMAGE_SIZE, ROW_IMAGE_SIZE, dtype=torch.bool)
    return batch


def _inkling_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    """``pixel_values [patches, t, p, p, 3]`` flat over the batch, one placeholder per patch."""
    vision = config.vision_config
    tokens = [h * w for _, h, w in GRIDS]
    ids, mask, _ = _texts(_split_runs(tokens), pad, generator)
    shape = (sum(tokens), vision.temporal_patch_size, vision.patch_size, vision.patch_size, 3)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(*shape)}


def _gemma4_batch(config: Any, generator: torch.Generator, pad: Sequence[int]) -> dict[str, Any]:
    """``pixel_values [images, patches, 3 * p * p]`` + ``image_position_ids [images, patches, 2]``
    (4x4 patches, pooled 2x2 into 4 soft tokens per image)."""
    n = sum(IMAGES_PER_SAMPLE)
    side = 4
    ids, mask, image = _texts(_split_runs([side * side // 4] * n), pad, generator)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1)
    width = 3 * GEMMA4_PATCH**2
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": image.long(),
        "pixel_values": torch.rand(n, side * side, width, generator=generator),
        "image_position_ids": grid.reshape(1, -1, 2).expand(n, -1, -1).clone(),
    }


_BATCHES: dict[str, Callable[[Any, torch.Generator, Sequence[int]], dict[str, Any]]] = {
    "qwen3_vl_moe": _qwen_batch,
    "qwen3_5_moe": _qwen_batch,
    "glm4v_moe": _qwen_batch,
    "ernie4_5_vl_moe": _ernie_batch,
    "qwen3_omni_moe_thinker": _omni_batch,
    "minimax_m3_vl": _qwen_batch,
    "llama4": _rows_batch,
    "aria": _aria_batch,
    "inkling_mm_model": _inkling_batch,
    "gemma4": _gemma4_batch,
}


def tiny_batch(
    model_type: str, config: Any, *, seed: int = 0, pad: Sequence[int] = (0, 0, 0, 0)
) -> dict[str, Any]:
    """A batch of ``len(IMAGES_PER_SAMPLE)`` samples with images in the processor's layout,
    ``labels`` equal to ``input_ids`` except at padding and image placeholders (-100), and
    ``pad[i]`` trailing padding tokens in sample ``i``."""
    generator = torch.Generator().manual_seed(seed)
    batch = _BATCHES[model_type](config, generator, pad)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[batch["input_ids"] == IMAGE] = -100
    batch["labels"] = labels
    return batch


#: Fields with one row per image; ``pixel_values`` rows per image are ``_pixel_rows``.
_PER_IMAGE = ("image_grid_thw", "image_position_ids", "pixel_mask")


def _pixel_rows(model_type: str) -> list[int]:
    if model_type in ("llama4", "aria", "gemma4"):
        return [1] * len(GRIDS)
    if model_type == "inkling_mm_model":
        return [h * w for _, h, w in GRIDS]
    return [t * h * w for t, h, w in GRIDS]


def microbatches(model_type: str, batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``batch`` split into ``n`` microbatches by the engine's rule (``torch.tensor_split`` of
    the samples), each with exactly its samples' images."""
    samples = torch.arange(len(IMAGES_PER_SAMPLE))
    first_image = [0, *torch.tensor(IMAGES_PER_SAMPLE).cumsum(0).tolist()]
    first_row = [0, *torch.tensor(_pixel_rows(model_type)).cumsum(0).tolist()]
    chunks = []
    for part in torch.tensor_split(samples, n):
        lo, hi = int(part[0]), int(part[-1]) + 1
        images = slice(first_image[lo], first_image[hi])
        rows = slice(first_row[images.start], first_row[images.stop])
        chunk = {}
        for key, value in batch.items():
            if key == "pixel_values":
                chunk[key] = value[rows]
            elif key in _PER_IMAGE:
                chunk[key] = value[images]
            else:
                chunk[key] = value[lo:hi]
        if images.start == images.stop:
            for key in ("pixel_values", *_PER_IMAGE):
                chunk.pop(key, None)
        chunks.append(chunk)
    return chunks
