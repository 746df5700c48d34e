"""Weights into a model: an HF folder (safetensors, sharded or not; .bin), or dummy values."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn


def iter_folder_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(folder, name) for name in files]
    else:
        paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if paths:
        from safetensors import safe_open

        for path in paths:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not bins:
        raise FileNotFoundError(
            f"no *.safetensors or pytorch_model*.bin weights in {folder}; "
            "use --load-format dummy for random weights"
        )
    for path in bins:
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Small random values (norms at 1) so activations stay finite in deep models; drawn on
    the parameters' device, so an 8B model fills in a second on a GPU."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed + i)
        param.data.uniform_(-1e-2, 1e-2, generator=gen)
