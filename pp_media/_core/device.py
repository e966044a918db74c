"""Moving prepared media to the device that runs the vision encoder."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from pp_media._keys import VLM_PP_MEDIA_KEY


def move_vlm_media_to_device(
    batch: MutableMapping[str, Any],
    device: torch.device | str,
    *,
    non_blocking: bool = False,
) -> MutableMapping[str, Any]:
    """Move every media chunk of a prepared batch to ``device``; returns ``batch``.

    Text tensors are left alone (the training loop moves those). With pinned CPU chunks
    (``DataLoader(pin_memory=True)``) and ``non_blocking=True`` the copies are asynchronous.
    """
    media = batch.get(VLM_PP_MEDIA_KEY)
    if media is None:
        return batch
    batch[VLM_PP_MEDIA_KEY] = {
        name: [chunk.to(device, non_blocking=non_blocking) for chunk in chunks]
        for name, chunks in media.items()
    }
    return batch
