"""Reference attention with torch's SDPA: works on any device, plans nothing clever.

Extend runs one SDPA per request (its new queries against prefix + new keys, causal with
the prefix offset); decode gathers every request's keys into one padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.layers.attention.base import Attention, AttentionBackend


@dataclass
class _ExtendPlan:
    kv_indices: list[torch.Tensor]  # per request: its KV slots, positions 0..seq_len-1
    masks: list[torch.Tensor]  # per request: (extend_len, seq_len) bool, True = attend
    q_offsets: list[int]


@dataclass
class _DecodePlan:
    kv_indices: torch.Tensor  # (bs, max_len)
    mask: torch.Tensor  # (bs, 1, 1, max_len) bool


class TorchNativeBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        table = self.req_to_token_pool.req_to_token
        device = table.device
        if batch.mode is ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            idx = table[batch.req_pool_indices, :max_len].to(torch.int64)
            mask = torch.arange(max_len, device=device)[None, :] < batch.seq_lens[:, None]
            batch.attn_metadata = _DecodePlan(idx, mask[:, None, None, :])
            return
        rows = batch.req_pool_indices.tolist()
        kv_indices, masks, offsets, offset = [], [], [], 0
        for row, prefix, ext in zip(rows, batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu):
            seq = prefix + ext
            kv_indices.append(table[row, :seq].to(torch.int64))
            q_pos = torch.arange(prefix, seq, device=device)
            masks.append(torch.arange(seq, device=device)[None, :] <= q_pos[:, None])
            offsets.append(offset)
            offset += ext
        batch.attn_metadata = _ExtendPlan(kv_indices, masks, offsets)

    def extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        plan: _ExtendPlan = batch.attn_metadata
        k_buf, v_buf = layer.kv.k, layer.kv.v
        out = torch.empty_like(q)
        for kv_idx, mask, start in zip(plan.kv_indices, plan.masks, plan.q_offsets):
            n = mask.shape[0]
            qi = q[start : start + n].transpose(0, 1)  # (heads, n, d)
            ki = k_buf[kv_idx].transpose(0, 1).to(q.dtype)  # (kv_heads, seq, d)
            vi = v_buf[kv_idx].transpose(0, 1).to(q.dtype)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=layer.scale, enable_gqa=True
            )
            out[start : start + n] = oi.transpose(0, 1)
        return out

    def decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        plan: _DecodePlan = batch.attn_metadata
        k = layer.kv.k[plan.kv_indices].to(q.dtype)
        v = layer.kv.v[plan.kv_indices].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (bs, heads, 1, d)
            k.permute(0, 2, 1, 3),  # (bs, kv_heads, max_len, d)
            v.permute(0, 2, 1, 3),
            attn_mask=plan.mask,
            scale=layer.scale,
            enable_gqa=True,
        )
        return out.squeeze(2)
