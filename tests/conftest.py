"""Test-wide settings: a modest hypothesis budget so the core suite stays fast on 2 cores.

``HYPOTHESIS_PROFILE=thorough python -m pytest`` runs the property tests with more examples.
The repository root goes on ``sys.path`` so that ``tests.helpers`` imports under a bare
``pytest`` too (``python -m pytest`` from the root has it there already).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

settings.register_profile(
    "pp_media",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pp_media"))
