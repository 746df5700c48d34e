"""KV memory: request slots -> token slots, and the token-granular KV pool they index.

Slot 0 of the KV pool is never handed out: padded rows of a batch (CUDA graphs) write
their K/V there, so it must not belong to any request.
"""

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


class KVCachePool:
    """Per-layer KV buffers of shape (size + 1, 2, kv_heads, head_dim): a slot's K and V
    side by side, so one indexed store writes both; row 0 is padding. k_buffers and
    v_buffers are strided views of the same memory."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.size = size
        self.dtype = dtype
        shape = (size + 1, 2, num_kv_heads, head_dim)
        self.kv_buffers = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.k_buffers = [kv[:, 0] for kv in self.kv_buffers]
        self.v_buffers = [kv[:, 1] for kv in self.kv_buffers]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = _side_by_side(k, v)
        if kv is not None and kv.dtype == self.dtype:
            self.kv_buffers[layer][slots] = kv  # one kernel instead of two
            return
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)


def _side_by_side(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k and v (tokens, kv_heads, head_dim) as one (tokens, 2, kv_heads, head_dim) view
    when v directly follows k in every row, as it does in a fused QKV projection's output
    (head-dense rows); None otherwise."""
    n, heads, dim = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or k.stride() != v.stride():
        return None
    if k.stride()[1:] != (dim, 1) or v.data_ptr() - k.data_ptr() != heads * dim * k.element_size():
        return None
    if v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    return k.as_strided((n, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))
