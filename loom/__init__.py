"""loom: a structured-generation language and radix-attention runtime for LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str):
    # The runtime pulls in torch and transformers: import it only when asked for.
    if name == "Engine":
        from loom.runtime.engine import Engine

        return Engine
    if name == "ServerArgs":
        from loom.runtime.args import ServerArgs

        return ServerArgs
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
