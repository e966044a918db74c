"""Per-item processor extras follow their media rows, or are left alone without media."""

from __future__ import annotations

import re

import pytest
import torch

import pp_media


def _video_batch() -> dict[str, torch.Tensor]:
    grid = torch.tensor([[2, 2, 2], [1, 2, 2], [2, 2, 4]])  # 8, 4 and 16 patches
    return {
        "input_ids": torch.zeros(3, 4, dtype=torch.long),
        "pixel_values_videos": torch.arange(28.0).view(28, 1),
        "video_grid_thw": grid,
        "n_videos_per_sample": torch.tensor([1, 0, 2]),
        "second_per_grid_ts": torch.tensor([0.5, 1.0, 2.0]),
    }


def test_second_per_grid_ts_follows_the_videos() -> None:
    batch = pp_media.prepare_vlm_media_for_pp(_video_batch(), 3, 2)
    media = batch[pp_media.VLM_PP_MEDIA_KEY]
    assert "second_per_grid_ts" not in batch
    assert [c.tolist() for c in media["second_per_grid_ts"]] == [[0.5], [1.0, 2.0]]
    assert [c.shape[0] for c in media["pixel_values_videos"]] == [8, 20]


def test_an_extra_with_the_wrong_rows_is_an_error_and_the_batch_is_kept() -> None:
    batch = _video_batch()
    batch["second_per_grid_ts"] = torch.tensor([0.5, 1.0])
    before = dict(batch)
    expected = "'second_per_grid_ts' (shape (2,), dtype torch.float32): expected dim 0 of size 3"
    with pytest.raises(ValueError, match=re.escape(expected)):
        pp_media.prepare_vlm_media_for_pp(batch, 3, 2)
    assert batch.keys() == before.keys()
    assert all(batch[key] is value for key, value in before.items())


def test_extras_without_their_media_are_not_touched() -> None:
    num_crops = torch.tensor([1, 2])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "num_crops": num_crops}
    assert pp_media.prepare_vlm_media_for_pp(batch, 2, 2) is batch
    assert batch["num_crops"] is num_crops and pp_media.VLM_PP_MEDIA_KEY not in batch
