"""The attention-backend interface and the attention layer that calls it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.memory.kv_pool import LayerKV
from loom.runtime.memory.req_to_token import ReqToTokenPool


class AttentionBackend(ABC):
    """Attention over the token-granular KV pool.

    `plan` runs once per batch (before the model's layers); `extend` and `decode` run once
    per layer on that batch. The new tokens' K/V are already stored in the layer's KV
    (`layer.kv`) at batch.out_cache_loc when they are called; the request's full KV is
    req_to_token[req_pool_indices[i], :seq_lens[i]].
    """

    supports_cuda_graph = False  # decode can be captured (fixed-address plan buffers)

    def __init__(self, req_to_token_pool: ReqToTokenPool):
        self.req_to_token_pool = req_to_token_pool

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Prepare per-batch metadata (index tensors, kernel plans) in batch.attn_metadata."""

    @abstractmethod
    def extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        """q: (num_tokens, heads, head_dim) -> (num_tokens, heads, head_dim), causal."""

    @abstractmethod
    def decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        """q: (bs, heads, head_dim) -> (bs, heads, head_dim)."""


class Attention(nn.Module):
    """Stores the new K/V in its layer's KV, then attends through the batch's backend."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend: AttentionBackend | None = None  # set by the model runner (bind)
        self.kv: LayerKV | None = None  # this layer's slice of the KV pool, likewise

    def bind(self, backend: AttentionBackend, kv: LayerKV) -> None:
        """Hands the layer the backend it attends through and its own layer's KV."""
        self.backend = backend
        self.kv = kv

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        self.kv.store(batch.out_cache_loc, k, v)
        return self.attend(q, batch)

    def attend(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Attention over the pool, whose K/V for the batch's new tokens are stored."""
        if batch.mode is ForwardMode.DECODE:
            return self.backend.decode(q, self, batch)
        return self.backend.extend(q, self, batch)
