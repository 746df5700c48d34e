"""The gated MLP of the Llama family: down(act(gate(x)) * up(x)), gate and up fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.runtime.layers import cuda_kernels

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, "tanh")}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias=False):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; supported: {sorted(_ACTIVATIONS)}")
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = _ACTIVATIONS[act]
        self.fused_silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_silu and cuda_kernels.available(gate_up):
            return self.down_proj(cuda_kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)
