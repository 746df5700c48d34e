"""Architecture name (config.architectures[0]) -> model class."""

from __future__ import annotations

from torch import nn

from loom.runtime.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from loom.runtime.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def model_class(config) -> type[nn.Module]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {archs or getattr(config, 'model_type', '?')}; "
        f"loom supports {sorted(ARCHITECTURES)}"
    )
