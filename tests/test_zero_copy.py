"""Invariant 4: chunks are views of the collated tensors, and a batch costs at most one
device-to-host read."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pp_media import (
    VLM_PP_MEDIA_KEY,
    chunk_step3_media,
    chunk_vlm_media,
    prepare_vlm_media_for_pp,
)
from tests.helpers import media_batches as mb
from tests.helpers.strategies import IMAGE_LAYOUTS, build_batch, example_spec

#: Tensor methods and functions whose result is read on the host (a sync on an accelerator).
HOST_READ_NAMES = frozenset(
    {
        "tolist",
        "item",
        "__int__",
        "__bool__",
        "__index__",
        "__float__",
        "__complex__",
        "__array__",
        "__format__",
        "__repr__",
        "__str__",
        "numpy",
        "cpu",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
        "equal",
        "allclose",
        "is_nonzero",
        "_local_scalar_dense",
    }
)
#: Ops that read their tensor arguments on the host: sizes from a tensor.
SIZE_FROM_TENSOR = frozenset(
    {"tensor_split", "split", "split_with_sizes", "repeat_interleave", "narrow", "new_empty"}
)
#: Indexing ops: a bool mask as index means a data-dependent output size.
INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})


def _is_cpu(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def _flat(values: Any) -> Iterator[Any]:
    if isinstance(values, (tuple, list)):
        for value in values:
            yield from _flat(value)
    else:
        yield values


class HostReads(TorchFunctionMode):
    """Records every torch call made under it that reads tensor values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if self._reads_host(name, args, kwargs):
            self.reads.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _reads_host(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if name in HOST_READ_NAMES:
            return True
        rest = list(_flat(list(args[1:]) + list(kwargs.values())))
        if name in ("to", "copy_"):
            # A copy to the CPU: .to("cpu"), .to(device=...), cpu_tensor.copy_(device_tensor)
            if any(_is_cpu(value) for value in rest):
                return True
            return name == "copy_" and any(
                isinstance(v, torch.Tensor) and v.device != args[0].device for v in rest
            )
        if name in SIZE_FROM_TENSOR:
            return any(isinstance(value, torch.Tensor) for value in rest)
        if name in INDEXING:
            return any(
                isinstance(value, torch.Tensor) and value.dtype == torch.bool for value in rest
            )
        return False


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """``with host_reads() as reads:`` collects the names of host-reading ops in ``reads``."""
    mode = HostReads()
    with mode:
        yield mode.reads


def test_mode_sees_host_reads() -> None:
    """The recorder really sees Tensor methods (tolist, item, ...) and implicit reads."""
    t = torch.arange(6)
    with host_reads() as reads:
        t.tolist()
        t[1].item()
        int(t[2])
        bool(t[3])
        float(t[4])
        range(10)[t[5]]
        t.nonzero()
        t[t > 2]
        t.numpy()
        t.to("cpu")
        torch.tensor_split(t, torch.tensor([2]))
        t.repeat_interleave(t)
    expected = ["tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero"]
    assert reads[: len(expected)] == expected
    assert reads[len(expected) :] == [
        "__getitem__",
        "numpy",
        "to",
        "tensor_split",
        "repeat_interleave",
    ]


def test_mode_ignores_device_side_ops() -> None:
    """Shape reads, slicing, cat, cumsum, min, integer-tensor indexing are not host reads."""
    t = torch.arange(6)
    with host_reads() as reads:
        _ = t.shape[0], t.dim(), t.numel()
        torch.cat([t[:2], t[4:]]).cumsum(0)[torch.tensor([0, 2])]
        t.min().view(1).to(torch.int64)
        t.split_with_sizes([2, 4])
    assert reads == []


def _images_and_videos() -> mb.MediaBatch:
    return build_batch(example_spec("qwen", videos=True))


def test_prepare_images_and_videos_reads_the_host_once() -> None:
    """A batch with images AND videos: exactly one ``tolist``, nothing else reads the host."""
    media = _images_and_videos()
    with host_reads() as reads:
        prepare_vlm_media_for_pp(media.batch, media.batch_size, 2)
    assert reads == ["tolist"]
    mb.assert_chunks_aligned(media.batch[VLM_PP_MEDIA_KEY], media, 2)


@pytest.mark.parametrize(
    ("layout", "videos"),
    [(layout, videos) for layout in IMAGE_LAYOUTS for videos in (False, True) if layout != "none"]
    + [("none", True)],
)
def test_prepare_reads_the_host_at_most_once(layout: str, videos: bool) -> None:
    """Every layout, with or without videos: at most one ``tolist`` and no other host read."""
    media = build_batch(example_spec(layout, n_microbatches=3, videos=videos))
    with host_reads() as reads:
        prepare_vlm_media_for_pp(media.batch, media.batch_size, 3)
    assert reads in ([], ["tolist"])


def test_chunk_functions_read_the_host_at_most_once() -> None:
    """``chunk_vlm_media`` (flat, with counts) and ``chunk_step3_media`` read once each."""
    qwen = _images_and_videos().batch
    step3 = build_batch(example_spec("step3", videos=False)).batch
    with host_reads() as reads:
        chunk_vlm_media(
            qwen["pixel_values"], qwen["image_grid_thw"], 5, 2, qwen["n_images_per_sample"]
        )
    assert reads == ["tolist"]
    with host_reads() as reads:
        chunk_step3_media(
            step3["pixel_values"],
            5,
            2,
            step3["num_patches"],
            step3["patch_pixel_values"],
            step3["patch_newline_mask"],
        )
    assert reads in ([], ["tolist"])


def test_one_image_per_sample_needs_no_host_read() -> None:
    """``[B, C, H, W]`` with a B-row grid: the split follows from shapes alone."""
    media = build_batch(example_spec("images_4d", videos=False))
    with host_reads() as reads:
        prepare_vlm_media_for_pp(media.batch, media.batch_size, 2)
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_device_sync_on_cuda() -> None:
    """On a GPU, preparing images and videos synchronises with the device exactly once."""
    media = _images_and_videos()
    for key in list(media.batch):
        if isinstance(media.batch[key], torch.Tensor):
            media.batch[key] = media.batch[key].cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepare_vlm_media_for_pp(media.batch, media.batch_size, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# --- views -------------------------------------------------------------------------------


def _bump(tensor: torch.Tensor) -> None:
    """Change every element of ``tensor`` in place."""
    if tensor.dtype == torch.bool:
        tensor.logical_not_()
    else:
        tensor.add_(7)


def _assert_views(
    chunks: dict[str, list[torch.Tensor]], originals: dict[str, torch.Tensor]
) -> None:
    """Every non-empty chunk shares its original's storage, and sees writes into it."""
    checked = 0
    for name, field_chunks in chunks.items():
        original = originals[name]
        before = [chunk.clone() for chunk in field_chunks]
        for chunk in field_chunks:
            if chunk.numel():
                assert chunk.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
                checked += 1
        _bump(original)
        for chunk, old in zip(field_chunks, before, strict=True):
            bumped = old.clone()
            _bump(bumped)
            assert torch.equal(chunk, bumped), name
    assert checked


@pytest.mark.parametrize("layout", IMAGE_LAYOUTS)
def test_prepared_chunks_are_views(layout: str) -> None:
    """prepare: every field of every layout (images and videos) is split into views."""
    media = build_batch(example_spec(layout, n_microbatches=3, videos=True))
    prepare_vlm_media_for_pp(media.batch, media.batch_size, 3)
    stored = media.batch[VLM_PP_MEDIA_KEY]
    _assert_views({k: v for k, v in stored.items() if k in media.originals}, media.originals)


def test_chunk_vlm_media_returns_views() -> None:
    """chunk_vlm_media: pixel and grid chunks are views."""
    batch = _images_and_videos().batch
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    pixel_chunks, grid_chunks = chunk_vlm_media(pixels, grid, 5, 2, batch["n_images_per_sample"])
    _assert_views({"p": pixel_chunks, "g": grid_chunks}, {"p": pixels, "g": grid})


def test_chunk_step3_media_returns_views() -> None:
    """chunk_step3_media: images, num_patches, crops and newline mask chunks are views."""
    batch = build_batch(example_spec("step3", videos=False)).batch
    names = ("pixel_values", "num_patches", "patch_pixel_values", "patch_newline_mask")
    chunks = chunk_step3_media(batch["pixel_values"], 5, 3, *(batch[name] for name in names[1:]))
    _assert_views(chunks, {name: batch[name] for name in names})


def test_views_of_non_contiguous_inputs() -> None:
    """A strided (non-contiguous) pixel tensor is split into views too, not copied."""
    base = torch.arange(4 * 10, dtype=torch.float32).reshape(4, 10)
    pixels = base.t()  # [10, 4], non-contiguous
    grid = torch.tensor([[1, 1, 1], [1, 2, 2], [1, 1, 2], [1, 1, 3]])
    pixel_chunks, _ = chunk_vlm_media(pixels, grid, 4, 3)
    assert not pixels.is_contiguous()
    _assert_views({"p": pixel_chunks}, {"p": pixels})
    assert torch.equal(torch.cat(pixel_chunks), pixels)
