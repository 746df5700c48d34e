"""The request-to-token table: a request slot and a position -> the KV slot of that token."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps a request slot and a position to the KV slot holding that token.

    One extra row past `capacity` is never handed out: padded batch rows (CUDA graphs)
    read it.
    """

    def __init__(self, capacity: int, max_context_len: int, device: torch.device | str):
        self.capacity = capacity
        self.num_slots = capacity + 1
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros(
            (self.num_slots, max_context_len), dtype=torch.int32, device=device
        )
        self._free = list(range(capacity - 1, -1, -1))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, start: int, kv_slots: torch.Tensor) -> None:
        self.req_to_token[slot, start : start + kv_slots.numel()] = kv_slots.to(torch.int32)

    def write_positions(self, rows: list[int], positions: list[int], kv_slots: torch.Tensor):
        """req_to_token[rows[i], positions[i]] = kv_slots[i], in one indexed store."""
        dev = self.req_to_token.device
        index = torch.tensor([rows, positions], dtype=torch.int64)
        if dev.type == "cuda":  # pinned + non_blocking: the host must not wait for the device
            index = index.pin_memory().to(dev, non_blocking=True)
        self.req_to_token[index[0], index[1]] = kv_slots.to(torch.int32)

    def read(self, slot: int, start: int, end: int) -> torch.Tensor:
        return self.req_to_token[slot, start:end].to(torch.int64)
