"""The seed's analytical stage metadata: ``_configure_outputs_meta`` on a duck-typed stage 0.

The seed's pipeline (no visible torch stage) sets a stage's output shapes through
``stage._configure_outputs_meta(...)`` instead of running a shape-inference forward. Such a
stage 0 must not arm the reset of ``_vlm_chunk_idx`` after the first forward: that forward is a
real microbatch, and a reset would hand microbatch 1 the media of microbatch 0 again.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

import pytest
import torch
from torch import nn

import pp_media


class SeedStyle(nn.Module):
    """Seed-style stage 0: reads its media at ``_vlm_chunk_idx`` and advances the index."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[int] = []
        self.owners: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._vlm_chunk_idx
        self.used.append(index)
        self.owners.append(float(self._vlm_pixel_values_chunks[index][0, 0]))
        self._vlm_chunk_idx += 1
        return x


def _batch() -> dict[str, Any]:
    """Two samples with one image each, in two microbatches; pixel value = owner's index."""
    batch: dict[str, Any] = {
        "input_ids": torch.zeros(2, 3, dtype=torch.int64),
        "pixel_values": torch.tensor([[0.0] * 4, [1.0] * 4]),
        "image_grid_thw": torch.ones(2, 3, dtype=torch.int64),
        "n_images_per_sample": torch.tensor([1, 1]),
    }
    return pp_media.prepare_vlm_media_for_pp(batch, 2, 2)


def _seed_pp(first_stage: Any) -> Any:
    """The seed's ``pp``: shape inference pending, stage 0 found in ``pp.info.stages``."""
    schedule = SimpleNamespace(_stage_forward_initialized=False)
    info = SimpleNamespace(has_first_stage=True, schedule=schedule, stages=[first_stage])
    return SimpleNamespace(info=info)


def _run(first_stage: Any, forwards: int) -> SeedStyle:
    module = SeedStyle()
    with pp_media.stage_vlm_media_for_pp(_seed_pp(first_stage), [module], _batch()):
        for _ in range(forwards):
            module(torch.zeros(1))
    return module


@pytest.mark.parametrize(
    "stage",
    [
        SimpleNamespace(is_first=True, inputs_meta=None, _configure_outputs_meta=Mock()),
        SimpleNamespace(
            is_first=True, _outputs_meta=None, _user_meta=None, _configure_outputs_meta=Mock()
        ),
    ],
    ids=["configure_outputs_meta", "configure_outputs_meta_before_it_is_called"],
)
def test_analytical_metadata_keeps_the_index_after_the_first_forward(stage: Any) -> None:
    module = _run(stage, forwards=2)  # no shape-inference forward: microbatches 0 and 1
    assert module.used == [0, 1]
    assert module.owners == [0.0, 1.0]


def test_without_it_the_first_forward_is_still_taken_for_shape_inference() -> None:
    stage = SimpleNamespace(is_first=True, inputs_meta=None)
    module = _run(stage, forwards=3)  # shape inference, then microbatches 0 and 1
    assert module.used == [0, 0, 1]
    assert module.owners == [0.0, 0.0, 1.0]
