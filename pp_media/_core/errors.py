"""Input checks whose messages name the field, its shape, and what was expected."""

from __future__ import annotations

from typing import Any

import torch

_PREFIX = "pp_media"


def describe(value: Any) -> str:
    """Short description of a value for error messages: shape and dtype for tensors."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return f"type {type(value).__name__}"


def media_error(field: str, value: Any, expected: str, fix: str = "") -> ValueError:
    """A ValueError for one bad field: what it is, what was expected, how to fix it."""
    message = f"{_PREFIX}: '{field}' ({describe(value)}): expected {expected}."
    if fix:
        message += f" {fix}"
    return ValueError(message)


def require_tensor(field: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a tensor, else raise naming the field."""
    if not isinstance(value, torch.Tensor):
        raise media_error(
            field,
            value,
            "a torch.Tensor",
            "Collate media into tensors (processor(..., return_tensors='pt')).",
        )
    return value


def require_int_tensor(field: str, value: Any, ndim: int) -> torch.Tensor:
    """Return ``value`` if it is an integer tensor with ``ndim`` dims, else raise."""
    tensor = require_tensor(field, value)
    if tensor.dim() != ndim or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise media_error(field, tensor, f"a {ndim}-D integer tensor")
    return tensor


def check_n_microbatches(n_microbatches: int) -> None:
    """A microbatch count is an int >= 1."""
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int):
        raise ValueError(f"{_PREFIX}: n_microbatches must be an int >= 1, got {n_microbatches!r}.")
    if n_microbatches < 1:
        raise ValueError(f"{_PREFIX}: n_microbatches must be >= 1, got {n_microbatches}.")


def check_microbatches(batch_size: int, n_microbatches: int) -> None:
    """The engine needs 1 <= n_microbatches <= batch_size; say so before it fails later."""
    check_n_microbatches(n_microbatches)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"{_PREFIX}: batch_size must be an int, got {batch_size!r}.")
    if batch_size < n_microbatches:
        raise ValueError(
            f"{_PREFIX}: batch_size {batch_size} is smaller than n_microbatches "
            f"{n_microbatches}; torch.distributed.pipelining needs at least one sample per "
            "microbatch. Use a larger batch or fewer microbatches."
        )
