"""Reading device-computed offsets on the host in one transfer per batch."""

from __future__ import annotations

import torch


class DeferredHostRead:
    """Collects small integer tensors and reads them all with a single ``tolist``.

    Every boundary and check value of a batch is queued here first, so a batch whose
    metadata lives on an accelerator costs one device-to-host sync, not one per field.
    """

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> int:
        """Queue a 1-D int64 tensor; returns the handle to look its values up after ``read``."""
        self._parts.append(values)
        return len(self._parts) - 1

    def read(self) -> list[list[int]]:
        """One host read for everything queued; ``result[handle]`` is that tensor's values."""
        if not self._parts:
            return []
        if len(self._parts) == 1:
            return [self._parts[0].tolist()]
        devices = {part.device for part in self._parts}
        # Mixed devices are gathered on the CPU, one copy each.
        parts = [part.cpu() for part in self._parts] if len(devices) > 1 else self._parts
        flat = torch.cat(parts).tolist()
        values: list[list[int]] = []
        start = 0
        for part in parts:
            values.append(flat[start : start + part.numel()])
            start += part.numel()
        return values
