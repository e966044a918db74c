"""``move_vlm_media_to_device``: one copy per field, chunks stay views of one storage.

There is no accelerator here, so ``FakeAccelerator`` (a torch function mode) stands in for one:
``Tensor.to("cuda")`` becomes a copy into a new CPU storage, ``pin_memory`` a copy marked as
pinned, ``is_pinned`` answers from those marks; every copy is recorded with its
``non_blocking`` flag. A real GPU test runs where CUDA is available.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pp_media import VLM_PP_MEDIA_KEY, move_vlm_media_to_device, prepare_vlm_media_for_pp
from tests.helpers.strategies import build_batch, example_spec

M = 3


class FakeAccelerator(TorchFunctionMode):
    """Copies to a ``cuda`` device land in fresh CPU storage; records copies and pinning."""

    def __init__(self, pinned: set[int] | None = None) -> None:
        super().__init__()
        self.pinned = set(pinned or ())  # storage data_ptrs that count as pinned
        self.copies: list[tuple[tuple[int, ...], bool]] = []  # (shape, non_blocking) per copy
        self.pins: list[tuple[int, ...]] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "is_pinned":
            return args[0].untyped_storage().data_ptr() in self.pinned
        if name == "pin_memory":
            self.pins.append(tuple(args[0].shape))
            copy = args[0].clone()
            self.pinned.add(copy.untyped_storage().data_ptr())
            return copy
        if name == "to" and any(
            isinstance(a, torch.device) and a.type == "cuda" for a in (*args[1:], *kwargs.values())
        ):
            self.copies.append((tuple(args[0].shape), bool(kwargs.get("non_blocking", False))))
            return args[0].clone()  # preserve_format: the same strides, a new storage
        return func(*args, **kwargs)


def _prepared() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A prepared batch (flat images and videos, M=3) and its collated media tensors."""
    media = build_batch(example_spec("qwen", n_microbatches=M, videos=True))
    collated = dict(media.batch)
    prepare_vlm_media_for_pp(media.batch, media.batch_size, M)
    return media.batch, {name: collated[name] for name in media.batch[VLM_PP_MEDIA_KEY]}


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_one_copy_per_field_and_chunks_stay_views() -> None:
    """One ``to`` per field (not per chunk); the moved chunks are views of ONE new storage with
    the offsets they had, equal in value."""
    batch, originals = _prepared()
    before = {name: list(chunks) for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    with FakeAccelerator() as fake:
        move_vlm_media_to_device(batch, "cuda")
    moved = batch[VLM_PP_MEDIA_KEY]
    assert list(moved) == list(before)
    assert len(fake.copies) == len(before)  # one host-to-device copy per field
    assert sorted(shape for shape, _ in fake.copies) == sorted(
        tuple(originals[name].shape) for name in before
    )
    for name, chunks in before.items():
        new = moved[name]
        assert len(new) == M
        assert len({_storage(chunk) for chunk in new}) == 1, name
        assert _storage(new[0]) != _storage(originals[name])
        assert [c.storage_offset() for c in new] == [c.storage_offset() for c in chunks], name
        for got, want in zip(new, chunks, strict=True):
            assert got.shape == want.shape and got.stride() == want.stride()
            assert torch.equal(got, want)
    assert not any(non_blocking for _, non_blocking in fake.copies)
    assert fake.pins == []


def test_pinned_input_copies_asynchronously() -> None:
    """Chunks in pinned memory (a pinning DataLoader): non_blocking copies, no extra pinning."""
    batch, originals = _prepared()
    with FakeAccelerator(pinned={_storage(t) for t in originals.values()}) as fake:
        move_vlm_media_to_device(batch, "cuda")
    assert len(fake.copies) == len(originals)
    assert all(non_blocking for _, non_blocking in fake.copies)
    assert fake.pins == []


def test_dataloader_pinned_chunks_move_one_by_one_asynchronously() -> None:
    """``DataLoader(pin_memory=True)`` pins each chunk on its own (torch's ``pin_memory``
    recurses into the lists): no shared storage left, so one asynchronous copy per chunk."""
    batch, _ = _prepared()
    with FakeAccelerator() as fake:
        pinned = {
            name: [chunk.pin_memory() for chunk in chunks]
            for name, chunks in batch[VLM_PP_MEDIA_KEY].items()
        }
        batch[VLM_PP_MEDIA_KEY] = pinned
        fake.pins.clear()
        move_vlm_media_to_device(batch, "cuda")
    assert len(fake.copies) == sum(len(chunks) for chunks in pinned.values())
    assert all(non_blocking for _, non_blocking in fake.copies)
    assert fake.pins == []
    for name, chunks in pinned.items():
        for got, want in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert torch.equal(got, want)


def test_pin_memory_option_pins_each_field_once() -> None:
    """``pin_memory=True``: one pin and one asynchronous copy per field."""
    batch, originals = _prepared()
    before = {name: [c.clone() for c in chunks] for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    with FakeAccelerator() as fake:
        move_vlm_media_to_device(batch, "cuda", pin_memory=True)
    assert len(fake.pins) == len(fake.copies) == len(originals)
    assert all(non_blocking for _, non_blocking in fake.copies)
    for name, chunks in before.items():
        for got, want in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert torch.equal(got, want)


def test_non_blocking_flag_is_passed_on() -> None:
    """``non_blocking=True`` without pinned memory still asks for asynchronous copies."""
    batch, _ = _prepared()
    with FakeAccelerator() as fake:
        move_vlm_media_to_device(batch, "cuda", non_blocking=True)
    assert fake.copies and all(non_blocking for _, non_blocking in fake.copies)


def test_unrelated_chunks_are_copied_one_by_one() -> None:
    """Chunks that are not consecutive rows of one tensor: still moved, one copy each."""
    pieces = [torch.arange(6.0).reshape(3, 2), torch.zeros(0, 2), torch.ones(2, 2)]
    base = torch.arange(20.0).reshape(10, 2)
    gapped = [base[0:2], base[3:5], base[5:9]]  # one storage, but a gap after the first chunk
    batch: dict[str, Any] = {VLM_PP_MEDIA_KEY: {"separate": pieces, "gapped": gapped}}
    with FakeAccelerator() as fake:
        move_vlm_media_to_device(batch, "cuda")
    assert len(fake.copies) == len(pieces) + len(gapped)
    for name, chunks in (("separate", pieces), ("gapped", gapped)):
        for got, want in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert torch.equal(got, want)


def test_non_contiguous_field_keeps_its_strides() -> None:
    """A transposed field moves in one copy; its chunks keep strides, offsets and values."""
    pixels = torch.arange(40.0).reshape(4, 10).t()  # [10, 4], non-contiguous
    chunks = list(pixels.split_with_sizes([3, 0, 7]))
    batch: dict[str, Any] = {VLM_PP_MEDIA_KEY: {"pixel_values": chunks}}
    with FakeAccelerator() as fake:
        move_vlm_media_to_device(batch, "cuda")
    assert fake.copies == [((10, 4), False)]
    moved = batch[VLM_PP_MEDIA_KEY]["pixel_values"]
    assert len({_storage(c) for c in moved}) == 1
    for got, want in zip(moved, chunks, strict=True):
        assert got.stride() == want.stride()
        assert got.storage_offset() == want.storage_offset()
        assert torch.equal(got, want)


def test_same_device_keeps_the_chunks() -> None:
    """Moving to the device the chunks are on copies nothing: the same tensor objects."""
    batch, _ = _prepared()
    before = {name: list(chunks) for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    move_vlm_media_to_device(batch, "cpu", pin_memory=True)
    for name, chunks in before.items():
        assert all(a is b for a, b in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True))


def test_meta_device_one_copy_per_field() -> None:
    """A real ``Tensor.to`` (meta device): one call per field, shapes and dtypes kept."""
    batch, originals = _prepared()
    before = {name: list(chunks) for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    calls: list[str] = []

    class CountTo(TorchFunctionMode):
        def __torch_function__(
            self,
            func: Callable[..., Any],
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            if getattr(func, "__name__", "") == "to":
                calls.append("to")
            return func(*args, **(kwargs or {}))

    with CountTo():
        move_vlm_media_to_device(batch, "meta")
    assert len(calls) == len(originals)
    for name, chunks in before.items():
        for got, want in zip(batch[VLM_PP_MEDIA_KEY][name], chunks, strict=True):
            assert got.device.type == "meta"
            assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("bad", [[object()], torch.zeros(3, 2), [torch.zeros(1), 1.0]])
def test_bad_stored_media_leave_the_batch(bad: Any) -> None:
    """Stored media that are not lists of tensors: a ValueError naming the field, and nothing
    moved (the fields before it included)."""
    batch, _ = _prepared()
    media = batch[VLM_PP_MEDIA_KEY]
    media["bad"] = bad
    with pytest.raises(ValueError, match=rf"'{VLM_PP_MEDIA_KEY}\['bad'\]'.*a list of tensors"):
        move_vlm_media_to_device(batch, "meta")
    assert batch[VLM_PP_MEDIA_KEY] is media
    assert all(chunk.device.type == "cpu" for chunk in media["pixel_values"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin_memory", [False, True])
def test_move_to_cuda(pin_memory: bool) -> None:
    """On a GPU: chunks of each field share one CUDA storage, same offsets, equal values."""
    batch, _ = _prepared()
    before = {name: [c.clone() for c in chunks] for name, chunks in batch[VLM_PP_MEDIA_KEY].items()}
    offsets = {n: [c.storage_offset() for c in cs] for n, cs in batch[VLM_PP_MEDIA_KEY].items()}
    move_vlm_media_to_device(batch, "cuda", pin_memory=pin_memory)
    torch.cuda.synchronize()
    for name, chunks in batch[VLM_PP_MEDIA_KEY].items():
        assert all(chunk.is_cuda for chunk in chunks)
        assert len({_storage(chunk) for chunk in chunks}) == 1
        assert [c.storage_offset() for c in chunks] == offsets[name]
        for got, want in zip(chunks, before[name], strict=True):
            assert torch.equal(got.cpu(), want)


def test_helper_batches_start_at_offset_zero() -> None:
    """The offset comparisons above assume each collated field starts its storage."""
    _, originals = _prepared()
    assert all(tensor.storage_offset() == 0 for tensor in originals.values())
