"""Even microbatch shapes for batch sizes that the microbatch count does not divide.

torch's pipeline stages size their receive buffers from microbatch 0's shapes, so with B=6 and
M=4 (microbatches of 2, 2, 1, 1 samples) the 1-sample microbatches fail in send/recv
(measured on torch 2.13: "Stage output [1, ...], Output gradient [2, ...]"). Padding each
microbatch up to ``ceil(B / M)`` rows keeps every real sample in the microbatch the engine
gives it in the unpadded batch, so the media already split for B stay aligned.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds
from pp_media._core.errors import check_microbatches
from pp_media._keys import VLM_PP_MEDIA_KEY

#: Pad rows are dummy text-only samples: no loss (labels -100), and an attention mask of ones
#: so no attention row is fully masked (that would put NaNs into the pad rows' activations).
DEFAULT_PAD_VALUES: dict[str, int | float] = {"labels": -100, "attention_mask": 1}


def pad_to_even_microbatches(
    batch: MutableMapping[str, Any],
    batch_size: int,
    n_microbatches: int,
    *,
    pad_values: Mapping[str, int | float] | None = None,
    keys: Collection[str] | None = None,
) -> MutableMapping[str, Any]:
    """Give every microbatch ``ceil(B / M)`` rows by appending pad rows to the short ones.

    Every tensor of ``batch`` whose dim 0 is ``batch_size`` is re-laid out to
    ``M * ceil(B / M)`` rows: the engine's split of the result gives microbatch k exactly the
    samples it gets from the unpadded batch, followed by pad rows. Pad values come from
    ``pad_values`` (default: ``labels`` -100, ``attention_mask`` 1, anything else 0). Media
    under ``VLM_PP_MEDIA_KEY`` are untouched; pad rows carry none. ``keys`` limits the padding
    to those fields (for a tensor whose dim 0 only happens to equal B, such as M-RoPE
    ``position_ids [3, B, T]`` with B=3). Returns ``batch``.
    """
    check_microbatches(batch_size, n_microbatches)
    per_microbatch = -(-batch_size // n_microbatches)
    if per_microbatch * n_microbatches == batch_size:
        return batch
    values = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    bounds = sample_bounds(batch_size, n_microbatches)
    destination = torch.cat(
        [
            torch.arange(bounds[k + 1] - bounds[k]) + k * per_microbatch
            for k in range(n_microbatches)
        ]
    )
    for key, tensor in list(batch.items()):
        if key == VLM_PP_MEDIA_KEY or not isinstance(tensor, torch.Tensor):
            continue
        if keys is not None and key not in keys:
            continue
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            continue
        padded = tensor.new_full(
            (per_microbatch * n_microbatches, *tensor.shape[1:]), values.get(key, 0)
        )
        padded[destination.to(tensor.device)] = tensor
        batch[key] = padded
    return batch
