"""Prepared batches made in DataLoader workers, and moved to the vision encoder's device."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pp_media import (
    VLM_PP_MEDIA_KEY,
    move_vlm_media_to_device,
    wrap_vlm_collate_for_pp,
)
from tests.helpers import media_batches as mb

N_MICROBATCHES = 3


class Examples(Dataset):
    """Example i: ``i % 4`` images (0 for every fourth), ``i % 3 == 1`` videos."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, int]:
        return {"index": index, "images": index % 4, "videos": int(index % 3 == 1)}


def media_batch(examples: list[dict[str, int]]) -> mb.MediaBatch:
    """Flat Qwen-style images and videos for ``examples``, grids derived from the indices."""
    counts = [example["images"] for example in examples]
    video_counts = [example["videos"] for example in examples]
    grids = [(1, 1 + g % 2, 1 + g % 3) for g in range(sum(counts))]
    video_grids = [(2, 1, 1 + g % 2) for g in range(sum(video_counts))]
    media = mb.combine(
        len(examples), mb.qwen_images(counts, grids), mb.qwen_videos(video_counts, video_grids)
    )
    media.batch["index"] = torch.tensor([example["index"] for example in examples])
    return media


def collate(examples: list[dict[str, int]]) -> dict[str, Any]:
    """The VLM collate function the DataLoader runs (before wrapping)."""
    return media_batch(examples).batch


def _assert_same_batch(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if key == VLM_PP_MEDIA_KEY:
            continue
        assert torch.equal(got[key], value), key
    media, reference = got[VLM_PP_MEDIA_KEY], want[VLM_PP_MEDIA_KEY]
    assert set(media) == set(reference)
    for name, chunks in reference.items():
        assert len(media[name]) == len(chunks) == N_MICROBATCHES
        for got_chunk, want_chunk in zip(media[name], chunks, strict=True):
            assert got_chunk.dtype == want_chunk.dtype, name
            assert got_chunk.shape == want_chunk.shape, name
            assert torch.equal(got_chunk, want_chunk), name


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_prepared_batches_cross_the_worker_boundary(context: str) -> None:
    """Two workers, a wrapped collate: every batch equals the same batch prepared here."""
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method")
    dataset = Examples(23)  # batches of 5, 5, 5, 5, 3 samples
    wrapped = wrap_vlm_collate_for_pp(collate, N_MICROBATCHES)
    loader = DataLoader(
        dataset,
        batch_size=5,
        num_workers=2,
        collate_fn=wrapped,
        multiprocessing_context=context,
    )
    n_batches = 0
    for j, batch in enumerate(loader):
        examples = [dataset[i] for i in range(5 * j, min(5 * j + 5, len(dataset)))]
        _assert_same_batch(batch, wrapped(examples))
        assert VLM_PP_MEDIA_KEY in batch
        assert "pixel_values" not in batch
        n_batches += 1
    assert n_batches == 5


def test_worker_batches_stay_aligned() -> None:
    """The chunks a worker prepared still match the engine's split of its input_ids."""
    dataset = Examples(12)
    loader = DataLoader(
        dataset,
        batch_size=6,
        num_workers=2,
        collate_fn=wrap_vlm_collate_for_pp(collate, N_MICROBATCHES),
    )
    for j, batch in enumerate(loader):
        reference = media_batch([dataset[i] for i in range(6 * j, 6 * j + 6)])
        mb.assert_chunks_aligned(batch[VLM_PP_MEDIA_KEY], reference, N_MICROBATCHES)


def test_wrapped_collate_pickles() -> None:
    """The wrapped collate survives pickling (spawned workers receive it pickled)."""
    wrapped = wrap_vlm_collate_for_pp(collate, N_MICROBATCHES)
    clone = pickle.loads(pickle.dumps(wrapped))
    examples = [Examples(6)[i] for i in range(6)]
    _assert_same_batch(clone(examples), wrapped(examples))


# --- move_vlm_media_to_device ------------------------------------------------------------


def _prepared() -> dict[str, Any]:
    examples = [Examples(7)[i] for i in range(7)]
    return wrap_vlm_collate_for_pp(collate, N_MICROBATCHES)(examples)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_move_keeps_structure_shapes_and_dtypes(device: str | torch.device) -> None:
    """Every chunk moves; field names, chunk counts, shapes and dtypes stay; text is untouched."""
    batch = _prepared()
    before = {name: list(chunks) for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    text = {key: value for key, value in batch.items() if key != VLM_PP_MEDIA_KEY}
    keys = list(batch)
    out = move_vlm_media_to_device(batch, device)
    assert out is batch
    assert list(out) == keys
    for key, value in text.items():
        assert out[key] is value
    moved = out[VLM_PP_MEDIA_KEY]
    assert list(moved) == list(before)
    target = torch.device(device)
    for name, chunks in before.items():
        assert isinstance(moved[name], list)
        assert len(moved[name]) == len(chunks) == N_MICROBATCHES
        for got, want in zip(moved[name], chunks, strict=True):
            assert got.device.type == target.type
            assert got.shape == want.shape
            assert got.dtype == want.dtype
            if target.type == "cpu":
                assert torch.equal(got, want)


def test_move_non_blocking_option() -> None:
    """``non_blocking`` is accepted (keyword) and changes nothing on the CPU."""
    batch = _prepared()
    before = {name: [c.clone() for c in chunks] for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    move_vlm_media_to_device(batch, "cpu", non_blocking=True)
    for name, chunks in before.items():
        for got, want in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert torch.equal(got, want)


def test_move_without_media_returns_batch_unchanged() -> None:
    """A batch without prepared media: the same object, the same keys and values."""
    batch = dict(mb.text_fields(3))
    before = dict(batch)
    assert move_vlm_media_to_device(batch, "meta") is batch
    assert list(batch) == list(before)
    assert all(batch[key] is before[key] for key in before)
