"""Family adapters, looked up by ``config.model_type``."""

from __future__ import annotations

from typing import Any

from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.gemma import Gemma3Adapter, PaliGemmaAdapter
from pp_media._hf.families.idefics3 import Idefics3Adapter
from pp_media._hf.families.internvl import InternVLAdapter
from pp_media._hf.families.kimi import KimiK25Adapter
from pp_media._hf.families.llava import LlavaAdapter
from pp_media._hf.families.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from pp_media._hf.families.mistral3 import Mistral3Adapter
from pp_media._hf.families.qwen_vl import (
    Glm4vAdapter,
    Qwen3_5Adapter,
    Qwen3VLAdapter,
    QwenVLAdapter,
)
from pp_media._hf.families.step3 import Step3p7Adapter

_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make ``adapter`` serve every ``model_type`` it lists; returns it."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


for _adapter in (
    QwenVLAdapter(),
    Qwen3VLAdapter(),
    Qwen3_5Adapter(),
    Glm4vAdapter(),
    LlavaAdapter(),
    LlavaNextAdapter(),
    LlavaOnevisionAdapter(),
    Mistral3Adapter(),
    Gemma3Adapter(),
    PaliGemmaAdapter(),
    Idefics3Adapter(),
    InternVLAdapter(),
    KimiK25Adapter(),
    Step3p7Adapter(),
):
    register_family(_adapter)


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter of ``config.model_type``; a clear error for families not supported yet."""
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(
            f"pp_media: no stage-splitting adapter for model_type {model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. A family is a small FamilyAdapter subclass "
            "passed to pp_media.register_family."
        )
    return adapter


__all__ = [
    "FamilyAdapter",
    "LlavaAdapter",
    "MediaKind",
    "QwenVLAdapter",
    "adapter_for",
    "register_family",
    "supported_model_types",
]
