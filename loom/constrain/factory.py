"""Choose the grammar backend by name (`--grammar-backend`)."""

from __future__ import annotations

from typing import Any

from loom.constrain.base import GrammarBackend

BACKENDS = ("xgrammar", "none")


def create_grammar_backend(
    name: str, tokenizer: Any, vocab_size: int, **kwargs: Any
) -> GrammarBackend | None:
    """The named backend, or None for "none" (constrained requests are then refused)."""
    if name == "none":
        return None
    if name == "xgrammar":
        from loom.constrain.xgrammar_backend import XGrammarBackend  # heavy import, on demand

        return XGrammarBackend(tokenizer, vocab_size, **kwargs)
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {BACKENDS}")
