"""The mixture-of-experts families of the survey (``docs/moe_survey.md``): their tiny models and
batches, built from the family fixtures, and what transformers records as their router logits.

``tests/test_router_loss.py``, ``tests/test_hf_checkpoint_moe.py`` and
``benchmarks/moe_survey.py`` use it. A model is the family fixture's ``tiny_config`` (4 routed
experts, top-k 2, 4 decoder layers) with random routing biases; the one difference is Gemma4,
whose fixture keeps the MoE block off (as the checkpoints with per-layer inputs do) and whose
survey model turns it on. A batch is ``synthetic_batch`` (the family's processor or its layout
stand-in), and its microbatches are those a pipeline step gives stage 0 (pp_media's own split).
Llama4's ``ForConditionalGeneration.forward`` fails in transformers 5.24: ``reference_loss``
is its loss.
"""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._moe import EXPERT_WIDTH, EXPERTS, TOP_K, perturb_routing_biases
from pp_media.testing._synthetic import default_seq_len, synthetic_batch
from pp_media.testing._tiny import tiny_config

#: The surveyed families (``model_type``), each with a tiny fixture that builds and trains on CPU.
MODEL_TYPES = (
    "qwen3_vl_moe",
    "qwen3_5_moe",
    "glm4v_moe",
    "ernie4_5_vl_moe",
    "qwen3_omni_moe_thinker",
    "minimax_m3_vl",
    "llama4",
    "aria",
    "inkling_mm_model",
    "gemma4",
)
#: Families whose ``*ForConditionalGeneration`` adds ``router_aux_loss_coef * aux`` to its loss
#: when called with ``output_router_logits=True`` (transformers' ``load_balancing_loss_func``).
AUX_LOSS_FAMILIES = MODEL_TYPES[:6]
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
#: Gemma4's MoE block, beside the dense MLP of every layer.
_GEMMA4_MOE = {
    "enable_moe_block": True,
    "num_experts": EXPERTS,
    "top_k_experts": TOP_K,
    "moe_intermediate_size": EXPERT_WIDTH,
}
#: Samples per batch, at most this many images each; the seed gives samples 1 and 3 images
#: and leaves 0 and 2 text-only, so that 2 microbatches have images and 4 have text-only ones.
BATCH_SIZE, MAX_IMAGES, BATCH_SEED = 4, 2, 1


def survey_config(model_type: str) -> Any:
    """The family fixture's tiny config (Gemma4 with its MoE block on)."""
    config = tiny_config(model_type)
    if model_type == "gemma4":
        for name, value in _GEMMA4_MOE.items():
            setattr(config.text_config, name, value)
    return config


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random ``*ForConditionalGeneration`` of ``model_type`` in fp32, in train mode,
    with random routing biases (so biased routing differs from what the loss counts)."""
    from pp_media._hf.checkpoint import _model_factory

    config = survey_config(model_type)
    torch.manual_seed(seed)
    model = _model_factory(config)(config)
    perturb_routing_biases(model, seed)
    return model.train()


def tiny_batch(config: Any) -> dict[str, torch.Tensor]:
    """The survey batch of ``config``'s family: ``synthetic_batch``, right-padded to the
    length that fits ``MAX_IMAGES`` images in any sample."""
    seq_len = default_seq_len(config, max_images=MAX_IMAGES)
    return synthetic_batch(config, BATCH_SIZE, seq_len, seed=BATCH_SEED, max_images=MAX_IMAGES)


def routers(model: Any, model_type: str) -> tuple[list[Any], int]:
    """The modules recorded as ``router_logits`` (decoder layers in order) and the index."""
    cls, index = ROUTER_OUTPUTS[model_type]
    found = [m for _, m in model.named_modules() if type(m).__name__ == cls]
    return found, index


def microbatches(config: Any, batch: dict[str, torch.Tensor], n: int) -> list[dict[str, Any]]:
    """``batch`` as ``n`` forward inputs: each microbatch's text rows (the engine's split of
    the samples) and the media a pipeline step gives stage 0 for it."""
    from pp_media._core.bounds import sample_bounds
    from pp_media._hf.batch import prepare_step_inputs
    from pp_media._hf.families import adapter_for
    from pp_media._pipeline.staging import microbatch_media_kwargs

    adapter = adapter_for(config)
    step = prepare_step_inputs(batch, adapter, config, n)
    text = {"input_ids": step.input_ids, "labels": step.labels, **step.kwargs}
    bounds = sample_bounds(step.input_ids.shape[0], n)
    chunks = []
    for k in range(n):
        chunk = {name: value[bounds[k] : bounds[k + 1]] for name, value in text.items()}
        own = {name: c[k] for name, c in step.media.items()}
        chunk.update(microbatch_media_kwargs(own, adapter.media_layout))
        chunks.append(chunk)
    return chunks
