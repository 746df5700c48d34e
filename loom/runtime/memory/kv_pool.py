"""The token-granular KV pool: per layer, one buffer row per KV slot; row 0 is padding.

Each attention layer is handed its own layer's slice (`KVCachePool.layer`), so neither
a model nor an attention backend reaches into the pool for another layer's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's KV: `buffer` (size + 1, 2, kv_heads, head_dim) holds a slot's K and V
    side by side, so one indexed store writes both; `k` and `v` are strided views of it."""

    buffer: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def over(cls, buffer: torch.Tensor) -> LayerKV:
        return cls(buffer, buffer[:, 0], buffer[:, 1])

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def store(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = _side_by_side(k, v)
        if kv is not None and kv.dtype == self.dtype:
            self.buffer[slots] = kv  # one kernel instead of two
            return
        self.k[slots] = k.to(self.dtype)
        self.v[slots] = v.to(self.dtype)


class KVCachePool:
    """Per-layer KV buffers for `size` slots (1..size) plus the padding row 0."""

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
        self.num_layers = num_layers
        shape = (size + 1, 2, num_kv_heads, head_dim)
        self._layers = [
            LayerKV.over(torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)
        ]

    def layer(self, layer_id: int) -> LayerKV:
        return self._layers[layer_id]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


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
