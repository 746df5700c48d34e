"""Fused CUDA kernels from FlashInfer for the layers' hot path, when they can run.

Decode of a small batch is bound by kernel count as much as by bytes: the reference
RMSNorm and rotary are ~6 and ~12 elementwise kernels each; these are one.
"""

from __future__ import annotations

import torch

from loom.runtime.layers.switches import SWITCHES

try:
    import flashinfer.activation as _fi_act
    import flashinfer.norm as _fi_norm
    import flashinfer.rope as _fi_rope
except ImportError:  # CPU installs, or CUDA without the flashinfer extra
    _fi_act = _fi_norm = _fi_rope = None


def available(x: torch.Tensor) -> bool:
    return (
        SWITCHES.fused  # off (--disable-fused-kernels): the reference torch layers run
        and _fi_norm is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
    )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _fi_norm.rmsnorm(x, weight, eps)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; x = rmsnorm(residual), in place; returns (x, residual)."""
    _fi_norm.fused_add_rmsnorm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] in one kernel (two elementwise ones otherwise)."""
    return _fi_act.silu_and_mul(x)


def rope_inplace(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim), rotate-half layout."""
    n, _, head_dim = q.shape
    _fi_rope.apply_rope_with_cos_sin_cache_inplace(
        positions, q.view(n, -1), k.view(k.shape[0], -1), head_dim, cos_sin, is_neox=True
    )
