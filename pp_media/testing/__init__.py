"""Test fixtures of every supported family: tiny random configs, their image processors (or
layout stand-ins) and synthetic batches laid out as each family's processor and collate emit.

The tests, ``pp-media demo`` and ``pp-media inspect`` build their models and batches from here.
A family's fixture is one ``TinyFamily`` subclass in ``pp_media/testing/families/``, registered
with ``@tiny_family`` (see the README's "Adding a family"). Importing this module imports torch
and pp_media's model side, not transformers: configs and processors load it when built.
"""

from __future__ import annotations

from pp_media.testing import families as _families  # noqa: F401  (registers every fixture)
from pp_media.testing._router_reference import RouterReference, per_microbatch_router_loss
from pp_media.testing._stand_ins import FlatPatchLayout, MergedPatchLayout, Step3Layout
from pp_media.testing._synthetic import (
    builds_videos,
    default_seq_len,
    synthetic_batch,
    text_token_ids,
)
from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    TinyFamily,
    canonical_model_type,
    fixture_for,
    image_processor,
    reference_loss,
    tiny_config,
    tiny_family,
    tiny_model_types,
)

__all__ = [
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "VOCAB",
    "FlatPatchLayout",
    "MergedPatchLayout",
    "RouterReference",
    "Step3Layout",
    "TinyFamily",
    "builds_videos",
    "canonical_model_type",
    "default_seq_len",
    "fixture_for",
    "image_processor",
    "per_microbatch_router_loss",
    "reference_loss",
    "synthetic_batch",
    "text_token_ids",
    "tiny_config",
    "tiny_family",
    "tiny_model_types",
]
