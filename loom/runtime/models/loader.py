"""Weights into a model: an HF folder (safetensors, sharded or not; .bin), or dummy values."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn


def iter_folder_weights(
    folder: str, load_format: str = "auto"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in the folder. `load_format`: "safetensors" reads
    only *.safetensors, "pt" only pytorch_model*.bin, "auto" (and "gguf", whose file was
    converted to safetensors) safetensors if there are any, else .bin."""
    paths = [] if load_format == "pt" else _safetensors_files(folder)
    if paths:
        from safetensors import safe_open

        for path in paths:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = [] if load_format == "safetensors" else sorted(glob.glob(f"{folder}/pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(_no_weights(folder, load_format))
    for path in bins:
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, name) for name in files]


def _no_weights(folder: str, load_format: str) -> str:
    wanted = {"safetensors": "*.safetensors", "pt": "pytorch_model*.bin"}.get(
        load_format, "*.safetensors or pytorch_model*.bin"
    )
    hint = "" if load_format in ("auto", "gguf") else "; --load-format auto takes either"
    return f"no {wanted} weights in {folder}{hint}; --load-format dummy gives random weights"


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Small random values (norms at 1) so activations stay finite in deep models; drawn on
    the parameters' device, so an 8B model fills in a second on a GPU."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed + i)
        param.data.uniform_(-1e-2, 1e-2, generator=gen)
