"""pp_media: vision-language media that stay with their samples under pipeline parallelism.

Collate side: ``wrap_vlm_collate_for_pp`` / ``prepare_vlm_media_for_pp`` split the media per
microbatch exactly as ``torch.distributed.pipelining`` splits the text. Step side:
``stage_vlm_media_for_pp`` hands stage 0 the media of the microbatch it computes. Model side
(the ``hf`` extra): ``build_vlm_pipeline`` splits a Hugging Face VLM into pipeline stages;
those names load transformers on first use, so ``import pp_media`` needs only torch.
"""

from pp_media._core.balanced import (
    VLM_PP_SAMPLE_ORDER_KEY,
    balance_and_prepare_vlm_media_for_pp,
    balance_microbatches,
    restore_sample_order,
)
from pp_media._core.chunking import _select_image_grid as _select_image_grid
from pp_media._core.chunking import chunk_step3_media, chunk_vlm_media
from pp_media._core.counts import count_items_per_sample
from pp_media._core.device import move_vlm_media_to_device
from pp_media._core.media_plan import media_cost_per_sample
from pp_media._core.padding import pad_to_even_microbatches
from pp_media._core.prepare import prepare_vlm_media_for_pp, wrap_vlm_collate_for_pp
from pp_media._keys import _VLM_MEDIA_KEYS as _VLM_MEDIA_KEYS
from pp_media._keys import VLM_PP_MEDIA_KEY
from pp_media._layouts import (
    ONE_ROW,
    SEED_LAYOUT,
    CountRows,
    GridRows,
    MediaGroup,
    MediaLayout,
)
from pp_media._pipeline.staging import current_media, stage_vlm_media_for_pp
from pp_media._pipeline.step import step_with_media

__version__ = "0.1.0"

#: Model-side names, imported on first access (they need transformers).
_HF_NAMES = {
    "build_vlm_pipeline": "pp_media._hf.pipeline",
    "VLMPipeline": "pp_media._hf.pipeline",
    "FamilyAdapter": "pp_media._hf.families",
    "MediaKind": "pp_media._hf.families",
    "register_family": "pp_media._hf.families",
}


def __getattr__(name: str) -> object:
    module = _HF_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'pp_media' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ONE_ROW",
    "SEED_LAYOUT",
    "VLM_PP_MEDIA_KEY",
    "VLM_PP_SAMPLE_ORDER_KEY",
    "CountRows",
    "FamilyAdapter",
    "GridRows",
    "MediaGroup",
    "MediaKind",
    "MediaLayout",
    "VLMPipeline",
    "balance_and_prepare_vlm_media_for_pp",
    "balance_microbatches",
    "build_vlm_pipeline",
    "chunk_step3_media",
    "chunk_vlm_media",
    "count_items_per_sample",
    "current_media",
    "media_cost_per_sample",
    "move_vlm_media_to_device",
    "pad_to_even_microbatches",
    "prepare_vlm_media_for_pp",
    "register_family",
    "restore_sample_order",
    "stage_vlm_media_for_pp",
    "step_with_media",
    "wrap_vlm_collate_for_pp",
]
