"""Host <-> device copies that never make the host wait for the device.

Overlap scheduling builds batch N+1 while the device still runs batch N, so nothing on
that path may synchronize: PyTorch's plain host-to-device copy (`torch.tensor(x,
device="cuda")`) waits for the stream to drain, and reading a device tensor
(`.tolist()`) waits for everything queued before it, batch N+1 included. Inputs go up
from pinned memory with non_blocking copies; results come down into pinned memory
behind an event that the host waits on only when it needs them.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A 1-D (or nested) list as a tensor on `device`, queued without a host wait."""
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] for a host list of row indices, queued without a host wait (indexing with
    the list itself uploads it from pageable memory, which first waits for the device)."""
    return t[to_device(rows, torch.int64, t.device)]


class HostCopy:
    """Device tensors copied to the host when queued; `get` waits for that copy only."""

    def __init__(self, *tensors: torch.Tensor | None):
        self._event = None
        if not any(t is not None and t.is_cuda for t in tensors):
            self._host = tensors
            return
        self._host = tuple(None if t is None else _pinned_copy(t) for t in tensors)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> tuple[torch.Tensor | None, ...]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
