"""The Llama family: Llama 2/3/3.1 (incl. SmolLM2), Mistral and Qwen2 share this model.

Differences are configuration: Qwen2 puts a bias on q/k/v, Mistral may use a sliding
window, Qwen2 and small Llamas tie the LM head to the embeddings. Weights load from the
HF names, with q/k/v fused into one projection and gate/up into another.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.layers import rope_store, small_batch
from loom.runtime.layers.attention.base import Attention
from loom.runtime.layers.mlp import GatedMLP
from loom.runtime.layers.norm import RMSNorm
from loom.runtime.layers.rotary import RotaryEmbedding

# HF parameter-name fragment -> (fused parameter-name fragment, shard id)
_STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    qkv_bias_always = False  # Qwen2 sets True: bias on q/k/v, none on o

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = nn.Linear(
            config.hidden_size, q_size + 2 * kv_size, bias=bias or self.qkv_bias_always
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=bias)
        self.rotary = rotary
        self.attn = Attention(
            layer_id, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5
        )

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def has_qk_norm(self) -> bool:
        """Whether q and k are normed between the projection and RoPE (Qwen3): the fused
        kernels, which rotate straight out of the projection, then do not apply."""
        return type(self).qk_norm is not LlamaAttention.qk_norm

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch, rows=None):
        """Attention over every new token (all of them store K/V); the output projection
        only of `rows` when given."""
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        if self._rope_store(qkv):
            core = self.attn
            q = rope_store.rope_store(
                qkv,
                positions,
                self.rotary.cos_sin,
                core.kv.buffer,
                batch.out_cache_loc,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
            )
            return self._project(core.attend(q, batch).reshape(n, self.q_size), rows)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = self.qk_norm(q, k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, batch)
        return self._project(out.reshape(n, self.q_size), rows)

    def _project(self, out: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(out if rows is None else out[rows])

    def _rope_store(self, qkv: torch.Tensor) -> bool:
        """Whether RoPE and the K/V store run as one kernel (rope_store): with no q/k norm
        between the projection and RoPE, and a pool in the model's dtype."""
        return (
            not self.has_qk_norm()
            and rope_store.available(qkv, self.head_dim)
            and self.attn.kv.dtype == qkv.dtype
        )

    def load_shard(self, param: nn.Parameter, shard, weight: torch.Tensor) -> None:
        start = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[shard]
        param.data[start : start + weight.shape[0]].copy_(weight)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = self.attention_cls(config, layer_id, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )

    def forward(self, positions, hidden, residual, batch: ForwardBatch, rows=None):
        """rows: every token goes through attention (storing its K/V), but only these go on
        through the output projection and MLP, and only they are returned."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch, rows)
        if rows is not None:
            residual = residual[rows]
        hidden, residual = self.post_attention_layernorm.forward_with_residual(hidden, residual)
        return self.mlp(hidden), residual

    def supports_small_batch(self) -> bool:
        """Whether forward_small_batch computes what forward does for this layer."""
        attn = self.self_attn
        return not attn.has_qk_norm() and self.mlp.fused_silu and attn.head_dim % 16 == 0

    def forward_small_batch(self, batch: ForwardBatch, residual: torch.Tensor) -> None:
        """Decode of a few rows in five kernels (small_batch's), updating the residual
        stream in place: norm+qkv+RoPE+KV store, attention, o+add, norm+gate_up+SiLU,
        down+add."""
        attn, mlp, core = self.self_attn, self.mlp, self.self_attn.attn
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        q = small_batch.qkv_rope_store(
            residual,
            attn.qkv_proj.weight,
            attn.qkv_proj.bias,
            (norm1.weight, norm1.eps),
            batch.positions,
            batch.out_cache_loc,
            attn.rotary.cos_sin,
            core.kv.buffer,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
        )
        n = residual.shape[0]
        out = core.backend.decode(q.view(n, attn.num_heads, attn.head_dim), core, batch)
        o_proj = attn.o_proj
        small_batch.gemv(out.reshape(n, attn.q_size), o_proj.weight, o_proj.bias, residual=residual)
        gate_up = mlp.gate_up_proj
        act = small_batch.gemv_silu_mul(
            residual, gate_up.weight, gate_up.bias, norm=(norm2.weight, norm2.eps)
        )
        small_batch.gemv(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=residual)


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config, max_positions: int):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.layer_cls(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = rotary
        self._small_batch_layers: bool | None = None  # all layers can run small_batch's kernels

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final normed hidden states of every new token, (num_tokens, hidden); or, when
        batch.output_rows is set, of those rows only: the last layer's output projection and
        MLP then skip the other tokens, whose hidden states nothing reads."""
        if self._small_batch(batch):
            residual = self.embed_tokens(batch.input_ids)
            for layer in self.layers:
                layer.forward_small_batch(batch, residual)
            return self.norm(residual)
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = batch.output_rows if i == last else None
            hidden, residual = layer(batch.positions, hidden, residual, batch, rows)
        hidden, _ = self.norm.forward_with_residual(hidden, residual)
        return hidden

    def _small_batch(self, batch: ForwardBatch) -> bool:
        """Decode of at most small_batch.DECODE_ROWS rows runs through its fused kernels."""
        if batch.mode is not ForwardMode.DECODE or batch.batch_size > small_batch.DECODE_ROWS:
            return False
        weight = self.embed_tokens.weight
        if not small_batch.available(weight):
            return False
        if self._small_batch_layers is None:
            self._small_batch_layers = all(layer.supports_small_batch() for layer in self.layers)
        kv = self.layers[0].self_attn.attn.kv
        return self._small_batch_layers and kv.dtype == weight.dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype: the sampler widens them only when it needs to (a greedy
        batch's argmax is the same on bf16 logits, and skips a float32 copy of them)."""
        weight = self.lm_head_weight
        if hidden.shape[0] <= small_batch.DECODE_ROWS and small_batch.available(hidden):
            return small_batch.gemv(hidden.contiguous(), weight)  # faster than cuBLAS's GEMV
        return torch.nn.functional.linear(hidden, weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, weight in weights:
            name = _strip_prefix(hf_name)
            if name is None or "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target = self._load_one(params, name, weight)
            loaded.add(target)
        missing = {n for n in params if n not in loaded}
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")

    def _load_one(self, params: dict, name: str, weight: torch.Tensor) -> str:
        for fragment, (fused, shard) in _STACKED.items():
            if fragment not in name:
                continue
            target = name.replace(fragment, fused)
            param = params[target]
            weight = weight.to(param.dtype)
            if isinstance(shard, str):
                layer = self.layers[int(name.split(".")[1])]
                layer.self_attn.load_shard(param, shard, weight)
            else:
                size = param.shape[0] // 2
                param.data[shard * size : (shard + 1) * size].copy_(weight)
            return target
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in the checkpoint")
        params[name].data.copy_(weight.to(params[name].dtype))
        return name


def _strip_prefix(hf_name: str) -> str | None:
    """'model.layers.0.mlp...' -> 'layers.0.mlp...'; 'lm_head.weight' stays."""
    if hf_name.startswith("model."):
        return hf_name[len("model.") :]
    if hf_name.startswith("lm_head."):
        return hf_name
    return None


class Qwen2Attention(LlamaAttention):
    qkv_bias_always = True


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer


MistralForCausalLM = LlamaForCausalLM
