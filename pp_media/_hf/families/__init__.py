"""Family adapters, looked up by ``config.model_type``: one module per family in this package,
each registering its adapters with ``@family``; importing the package imports them all."""

from __future__ import annotations

import importlib
import pkgutil

from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import adapter_for, register_family, supported_model_types

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from pp_media._hf.families.llava import LlavaAdapter  # noqa: E402
from pp_media._hf.families.qwen_vl import QwenVLAdapter  # noqa: E402

__all__ = [
    "FamilyAdapter",
    "LlavaAdapter",
    "MediaKind",
    "QwenVLAdapter",
    "adapter_for",
    "register_family",
    "supported_model_types",
]
