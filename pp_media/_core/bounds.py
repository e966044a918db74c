"""The engine's microbatch boundaries.

``torch.distributed.pipelining`` splits every tensor with ``torch.tensor_split``: with B samples
and M microbatches the first ``B % M`` microbatches get ``B // M + 1`` samples, the rest
``B // M``. Media must follow exactly these boundaries, never ceil-sized ones.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=256)
def sample_bounds(batch_size: int, n_microbatches: int) -> tuple[int, ...]:
    """``M + 1`` sample offsets; microbatch k owns samples ``[b[k], b[k + 1])``."""
    base, extra = divmod(batch_size, n_microbatches)
    return tuple(k * base + min(k, extra) for k in range(n_microbatches + 1))


@functools.lru_cache(maxsize=256)
def sample_row_counts(batch_size: int, n_microbatches: int) -> tuple[int, ...]:
    """Samples per microbatch: ``B // M + 1`` for the first ``B % M``, then ``B // M``."""
    base, extra = divmod(batch_size, n_microbatches)
    return tuple(base + (k < extra) for k in range(n_microbatches))


@functools.lru_cache(maxsize=256)
def sample_bounds_tensor(
    batch_size: int, n_microbatches: int, device: torch.device
) -> torch.Tensor:
    """``sample_bounds`` built on ``device`` without a host-to-device copy (cached: read-only)."""
    base, extra = divmod(batch_size, n_microbatches)
    k = torch.arange(n_microbatches + 1, device=device, dtype=torch.int64)
    return k * base + k.clamp(max=extra)


@functools.lru_cache(maxsize=256)
def sample_ends_tensor(batch_size: int, n_microbatches: int, device: torch.device) -> torch.Tensor:
    """Index of the last sample of each microbatch, on ``device`` (cached: read-only)."""
    return sample_bounds_tensor(batch_size, n_microbatches, device)[1:] - 1
