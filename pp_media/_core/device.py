"""Moving prepared media to the device that runs the vision encoder.

The chunks of a field are consecutive row ranges of one collated tensor. Copying them one by
one would make ``n_microbatches`` small host-to-device copies per field; instead the rows they
cover are copied once and the chunks are cut again from the copy, as views with the same row
offsets, so the moved chunks stay zero-copy views of one storage per field.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from pp_media._core.errors import media_error
from pp_media._keys import VLM_PP_MEDIA_KEY


def move_vlm_media_to_device(
    batch: MutableMapping[str, Any],
    device: torch.device | str,
    *,
    non_blocking: bool = False,
    pin_memory: bool = False,
) -> MutableMapping[str, Any]:
    """Move every media chunk of a prepared batch to ``device``; returns ``batch``.

    One copy per field: the rows of all its chunks move together and the chunks are re-sliced
    from the moved tensor (views, same row offsets). Text tensors are left alone (the training
    loop moves those). A copy from pinned CPU memory is asynchronous: with ``pin_memory=True``,
    which pins each field's rows first (one host copy) when moving from the CPU to another
    device, or when the chunks are pinned already. ``DataLoader(pin_memory=True)`` pins every
    chunk into a buffer of its own, so those chunks move one by one (asynchronously); for one
    copy per field leave the loader's pinning off and pass ``pin_memory=True`` here.
    ``non_blocking=True`` asks for asynchronous copies in every case, as ``Tensor.to`` does.
    Stored media that are not lists of tensors raise a ``ValueError`` naming the field, and
    the batch is left unchanged.
    """
    media = batch.get(VLM_PP_MEDIA_KEY)
    if media is None:
        return batch
    target = torch.device(device)
    for name, chunks in media.items():
        if not isinstance(chunks, (list, tuple)) or not all(
            isinstance(chunk, torch.Tensor) for chunk in chunks
        ):
            raise media_error(
                f"{VLM_PP_MEDIA_KEY}[{name!r}]",
                chunks,
                "a list of tensors, one per microbatch",
                "Pass the batch that prepare_vlm_media_for_pp (or the wrapped collate) returned.",
            )
    batch[VLM_PP_MEDIA_KEY] = {
        name: _move_field(chunks, target, non_blocking, pin_memory)
        for name, chunks in media.items()
    }
    return batch


def _move_field(
    chunks: Sequence[torch.Tensor], target: torch.device, non_blocking: bool, pin_memory: bool
) -> list[torch.Tensor]:
    """One copy for the field's rows, then views; chunk by chunk only if they share no parent."""
    parent = _common_parent(chunks)
    if parent is None:
        return [_copy(chunk, target, non_blocking, pin_memory) for chunk in chunks]
    moved = _copy(parent, target, non_blocking, pin_memory)
    if moved is parent:  # already on the target device: keep the original views
        return list(chunks)
    return list(moved.split_with_sizes([chunk.shape[0] for chunk in chunks]))


def _common_parent(chunks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive dim-0 ranges the chunks are, as a view; None if not one.

    True for what ``prepare_vlm_media_for_pp`` stores (``split_with_sizes`` of one tensor):
    one storage, dtype and device, the same trailing shape and strides, and each chunk
    starting where the previous one ends.
    """
    if not chunks:
        return None
    first = chunks[0]
    if first.dim() == 0:
        return None
    if len(chunks) == 1:
        return first
    trailing, strides = first.shape[1:], first.stride()
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    rows = 0
    for chunk in chunks:
        if (
            chunk.dim() != first.dim()
            or chunk.shape[1:] != trailing
            or chunk.stride() != strides
            or chunk.dtype != first.dtype
            or chunk.device != first.device
            or chunk.untyped_storage().data_ptr() != storage
            or chunk.storage_offset() != offset + rows * strides[0]
        ):
            return None
        rows += chunk.shape[0]
    return first.as_strided((rows, *trailing), strides, offset)


def _copy(
    tensor: torch.Tensor, target: torch.device, non_blocking: bool, pin_memory: bool
) -> torch.Tensor:
    """``tensor.to(target)``; asynchronous from pinned memory, pinning first if asked."""
    from_host = tensor.device.type == "cpu" and target.type not in ("cpu", "meta")
    if from_host and pin_memory and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    asynchronous = non_blocking or (from_host and tensor.is_pinned())
    return tensor.to(target, non_blocking=asynchronous)
