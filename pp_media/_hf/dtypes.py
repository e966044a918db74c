"""The ``dtype`` option of ``build_vlm_pipeline``: a torch dtype or its name."""

from __future__ import annotations

import torch


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a floating-point ``torch.dtype``: a dtype, or its name (``"bfloat16"``,
    ``"torch.bfloat16"``); anything else is refused naming what is accepted."""
    if dtype is None or isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
    else:
        resolved = None
    if dtype is not None and (
        not isinstance(resolved, torch.dtype) or not resolved.is_floating_point
    ):
        raise ValueError(
            f"pp_media: dtype {dtype!r} is not a floating-point torch dtype; pass one such as "
            "torch.bfloat16 or its name: 'bfloat16', 'float16', 'float32'."
        )
    return resolved
