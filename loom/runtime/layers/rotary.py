"""Rotary position embedding (rotate-half form) with the HF rope scaling types.

Inverse frequencies come from transformers' own rope functions for scaled variants
(llama3, yarn, linear, ...), so loom's positions agree with the reference models.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.runtime.layers import cuda_kernels


def _inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    legacy = getattr(config, "rope_scaling", None) or {}
    rope_type = (
        params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    )
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        with torch.device("cpu"):  # also when the model is built on the meta device
            inv_freq, scaling = _inv_freq(config, head_dim)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            # The fused kernel's cache: (positions, head_dim) = [cos of each pair | sin of each].
        self.register_buffer(
            "cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scaling, persistent=False
        )
        freqs = torch.cat([freqs, freqs], dim=-1)  # rotate-half: both halves share angles
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim)."""
        if cuda_kernels.available(q):
            cuda_kernels.rope_inplace(positions, q, k, self.cos_sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
