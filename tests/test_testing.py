"""``pp_media.testing``: a fixture for every family the adapters serve, and no transformers on
import (configs and processors load it when built)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pp_media._hf.families import supported_model_types
from pp_media.testing import fixture_for, tiny_model_types


def test_every_supported_family_has_a_fixture_and_no_fixture_lacks_an_adapter() -> None:
    assert sorted(tiny_model_types()) == sorted(supported_model_types())


def test_an_unknown_model_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        fixture_for("nope")
    assert str(error.value) == (
        "pp_media: no tiny config for model_type 'nope'; choose one of "
        f"{', '.join(tiny_model_types())}, or pass a checkpoint directory."
    )


def test_importing_pp_media_and_its_fixtures_leaves_transformers_unloaded() -> None:
    code = (
        "import sys, pp_media, pp_media.testing; "
        "print(sorted(m for m in ('transformers', 'PIL') if m in sys.modules))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert printed.strip() == "[]"


def test_an_alias_builds_the_model_type_it_stands_for() -> None:
    """Inkling's model_type is ``inkling_mm_model`` (transformers' ``AutoConfig`` knows no
    ``inkling``); its family name is accepted too, and is no model type of its own."""
    from pp_media.testing import canonical_model_type, tiny_config

    assert canonical_model_type("inkling") == "inkling_mm_model"
    assert canonical_model_type("qwen2_vl") == "qwen2_vl"
    assert fixture_for("inkling") is fixture_for("inkling_mm_model")
    assert tiny_config("inkling").model_type == "inkling_mm_model"
    assert "inkling" not in tiny_model_types()
