"""Qwen3: the Llama layout with an RMSNorm on each head of q and k before rotary."""

from __future__ import annotations

import torch

from loom.runtime.layers.norm import RMSNorm
from loom.runtime.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_id, rotary):
        super().__init__(config, layer_id, rotary)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per-head norms on strided views of the fused qkv output: the reference path.
        return self.q_norm.forward_native(q), self.k_norm.forward_native(k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
