"""Benchmark scripts (``benchmarks/*.py``, not a package) imported as modules by their tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def loaded_benchmark(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as the module ``name`` while the caller's fixture lives (its
    dataclasses need it in ``sys.modules``); removed afterwards."""
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
