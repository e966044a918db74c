"""The family adapters, by ``config.model_type``: each adapter module registers its own."""

from __future__ import annotations

from typing import Any

from pp_media._hf.families.base import FamilyAdapter

_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make ``adapter`` serve every ``model_type`` it lists; returns it."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator of the adapters shipped here: registers an instance of ``cls``."""
    register_family(cls())
    return cls


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
