"""Fields that follow the pixel rows (``MediaGroup.per_row``): Gemma4's ``video_position_ids``,
one row per frame of ``pixel_values_videos``, split, balanced and checked with the frames."""

from __future__ import annotations

import re

import pytest
import torch

from pp_media import (
    VLM_PP_MEDIA_KEY,
    MediaGroup,
    MediaLayout,
    balance_and_prepare_vlm_media_for_pp,
    balance_microbatches,
    prepare_vlm_media_for_pp,
)
from pp_media._layouts import GEMMA4_LAYOUT

#: Videos per sample and frames per video: samples 0..3 own frame rows [0, 2), none, [2, 6),
#: [6, 7).
VIDEOS = [1, 0, 2, 1]
FRAMES = [2, 1, 3, 1]


def _frames_batch() -> dict[str, torch.Tensor]:
    """Gemma4 videos: every row of the pixels and of the positions holds its frame index."""
    frame = torch.arange(7)
    return {
        "input_ids": torch.arange(4).view(4, 1).repeat(1, 3),
        "pixel_values_videos": frame.view(7, 1, 1).expand(7, 3, 2).float().contiguous(),
        "video_position_ids": frame.view(7, 1, 1).expand(7, 3, 2).contiguous(),
        "num_frames_per_video": torch.tensor(FRAMES),
        "n_videos_per_sample": torch.tensor(VIDEOS),
    }


def _frame_ids(chunks: list[torch.Tensor]) -> list[list[int]]:
    return [chunk[:, 0, 0].long().tolist() for chunk in chunks]


def test_per_row_fields_split_with_the_pixel_rows() -> None:
    batch = _frames_batch()
    positions = batch["video_position_ids"]
    media = prepare_vlm_media_for_pp(batch, 4, 2, layout=GEMMA4_LAYOUT)[VLM_PP_MEDIA_KEY]
    assert _frame_ids(media["video_position_ids"]) == [[0, 1], [2, 3, 4, 5, 6]]
    assert _frame_ids(media["pixel_values_videos"]) == [[0, 1], [2, 3, 4, 5, 6]]
    assert [c.tolist() for c in media["num_frames_per_video"]] == [[2], [1, 3, 1]]
    assert "video_position_ids" not in batch
    for chunk in media["video_position_ids"]:  # views of the collated tensor
        assert chunk.untyped_storage().data_ptr() == positions.data_ptr()


def test_a_batch_without_the_per_row_field_splits_without_it() -> None:
    batch = _frames_batch()
    del batch["video_position_ids"]
    media = prepare_vlm_media_for_pp(batch, 4, 2, layout=GEMMA4_LAYOUT)[VLM_PP_MEDIA_KEY]
    assert set(media) == {"pixel_values_videos", "num_frames_per_video", "n_videos_per_sample"}
    assert _frame_ids(media["pixel_values_videos"]) == [[0, 1], [2, 3, 4, 5, 6]]


@pytest.mark.parametrize("fused", [False, True])
def test_per_row_fields_move_with_the_pixel_rows_when_balanced(fused: bool) -> None:
    """Costs that put samples 0 and 3 together: every frame row keeps its positions."""
    batch = _frames_batch()
    cost = [5, 4, 1, 0]
    if fused:
        order = balance_and_prepare_vlm_media_for_pp(batch, 4, 2, cost=cost, layout=GEMMA4_LAYOUT)
        media = batch[VLM_PP_MEDIA_KEY]
    else:
        order = balance_microbatches(batch, 4, 2, cost=cost, layout=GEMMA4_LAYOUT)
        assert batch["video_position_ids"][:, 0, 0].tolist() == [0, 1, 6, 2, 3, 4, 5]
        assert torch.equal(batch["video_position_ids"].float(), batch["pixel_values_videos"])
        media = prepare_vlm_media_for_pp(batch, 4, 2, layout=GEMMA4_LAYOUT)[VLM_PP_MEDIA_KEY]
    assert order.tolist() == [0, 3, 1, 2]
    assert _frame_ids(media["video_position_ids"]) == [[0, 1, 6], [2, 3, 4, 5]]
    assert _frame_ids(media["pixel_values_videos"]) == [[0, 1, 6], [2, 3, 4, 5]]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"video_position_ids": torch.zeros(6, 3, 2, dtype=torch.long)},
            "pp_media: 'video_position_ids' (shape (6, 3, 2), dtype torch.int64): expected dim 0 "
            "of size 7, the rows of 'pixel_values_videos' (shape (7, 3, 2)): it follows the pixel "
            "rows. Pass the 'video_position_ids' that the processor emitted with these "
            "'pixel_values_videos'.",
        ),
        (
            {"video_position_ids": torch.tensor(3)},
            "pp_media: 'video_position_ids' (shape (), dtype torch.int64): expected dim 0 of size "
            "7, the rows of 'pixel_values_videos' (shape (7, 3, 2)): it follows the pixel rows. "
            "Pass the 'video_position_ids' that the processor emitted with these "
            "'pixel_values_videos'.",
        ),
        (
            {"video_position_ids": [[0, 1]]},
            "pp_media: 'video_position_ids' (type list): expected a torch.Tensor. Collate media "
            "into tensors (processor(..., return_tensors='pt')).",
        ),
        (
            {"pixel_values_videos": None, "num_frames_per_video": None},
            "pp_media: 'video_position_ids' (shape (7, 3, 2), dtype torch.int64): expected to "
            "come with 'pixel_values_videos'. Without it there is nothing to align this field "
            "with; drop it or keep its media.",
        ),
    ],
)
@pytest.mark.parametrize("balance", [False, True])
def test_bad_per_row_fields_are_refused_by_name(changes: dict, message: str, balance: bool) -> None:
    batch = {**_frames_batch(), **changes}
    batch = {name: value for name, value in batch.items() if value is not None}
    before = dict(batch)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        if balance:
            balance_microbatches(batch, 4, 2, cost=[5, 4, 1, 0], layout=GEMMA4_LAYOUT)
        else:
            prepare_vlm_media_for_pp(batch, 4, 2, layout=GEMMA4_LAYOUT)
    assert batch.keys() == before.keys() and all(batch[k] is v for k, v in before.items())


@pytest.mark.parametrize(
    ("per_sample", "rows"), [(False, [[0, 1, 1], [], [3]]), (True, [[0, 1], [2], [3]])]
)
def test_per_row_fields_of_per_item_and_per_sample_pixels(per_sample: bool, rows: list) -> None:
    """Pixels with one row per item (counted) or per sample: the field follows those rows."""
    counts = [1, 2, 0, 1]
    layout = MediaLayout(
        (
            MediaGroup(
                "pixels",
                items=None if per_sample else "counts",
                per_row=("mask",),
            ),
        )
    )
    owners = [0, 1, 2, 3] if per_sample else [0, 1, 1, 3]
    batch = {
        "input_ids": torch.zeros(4, 2, dtype=torch.long),
        "pixels": torch.tensor(owners, dtype=torch.float).view(-1, 1),
        "mask": torch.tensor(owners).view(-1, 1),
    }
    if not per_sample:
        batch["counts"] = torch.tensor(counts)
    media = prepare_vlm_media_for_pp(batch, 4, 3, layout=layout)[VLM_PP_MEDIA_KEY]
    assert [c.view(-1).tolist() for c in media["mask"]] == rows
    assert [c.view(-1).long().tolist() for c in media["pixels"]] == rows
