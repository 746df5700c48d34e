"""Which KV slots are free: handed out by the allocator, never slot 0 (padding)."""

from __future__ import annotations

import torch


class KVAllocator:
    """Free list of KV slots kept as a stack: alloc and free cost O(tokens touched)."""

    def __init__(self, size: int, device: torch.device | str):
        self.size = size  # usable slots, 1..size
        self.device = torch.device(device)
        self._stack = torch.arange(1, size + 1, dtype=torch.int64, device=self.device)
        self._top = size

    def available(self) -> int:
        return self._top

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots, or None when fewer than n are free (nothing is taken then)."""
        if n > self._top:
            return None
        self._top -= n
        return self._stack[self._top : self._top + n].clone()

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if n == 0:
            return
        if self._top + n > self.size:
            raise RuntimeError(f"double free: {n} slots freed with {self._top}/{self.size} free")
        self._stack[self._top : self._top + n] = slots.to(self._stack.device).view(-1)
        self._top += n

    def reset(self) -> None:
        self._stack = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._top = self.size
