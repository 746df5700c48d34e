"""Which of loom's own kernels the layers may call, set from ServerArgs by the model runner
(`--disable-fused-kernels`, `--disable-small-batch-kernels`, `--disable-pdl`), read at call
time. Process-wide: the model runs in its scheduler process, one per server or Engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KernelSwitches:
    fused: bool = True  # FlashInfer's fused norm / rotary / SiLU and loom's rope_store
    small_batch: bool = True  # the Triton matrix-vector kernels of small decode batches
    pdl: bool = True  # programmatic dependent launch for those kernels on Hopper


SWITCHES = KernelSwitches()


def configure(*, fused: bool, small_batch: bool, pdl: bool) -> None:
    SWITCHES.fused, SWITCHES.small_batch, SWITCHES.pdl = fused, small_batch, pdl
