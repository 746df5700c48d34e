"""Choose the grammar backend by name (`--grammar-backend`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from loom.constrain.base import GrammarBackend

BACKENDS = ("auto", "llguidance", "xgrammar", "none")
logger = logging.getLogger(__name__)
Validator = Callable[[str, str, bool], None]  # (kind, text, lenient); raises GrammarError


def create_grammar_backend(
    name: str, tokenizer: Any, vocab_size: int, **kwargs: Any
) -> GrammarBackend | None:
    """The named backend, or None for "none" (constrained requests are then refused)."""
    if name == "none":
        return None
    if name == "auto":
        from loom.constrain.router import RoutingBackend

        built, errors = [], []
        for each in ("xgrammar", "llguidance"):
            try:
                built.append(_create(each, tokenizer, vocab_size, kwargs))
            except Exception as e:  # e.g. a tokenizer one library cannot read
                errors.append(f"{each}: {e}")
                logger.warning("grammar backend %s unavailable for this tokenizer: %s", each, e)
        if not built:
            raise ValueError("no grammar backend can use this tokenizer; " + "; ".join(errors))
        return RoutingBackend(built)
    if name in BACKENDS:
        return _create(name, tokenizer, vocab_size, kwargs)
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {BACKENDS}")


def _create(name: str, tokenizer: Any, vocab_size: int, kwargs: dict) -> GrammarBackend:
    if name == "xgrammar":  # heavy imports, on demand
        from loom.constrain.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, **kwargs)
    from loom.constrain.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size, **kwargs)


def constraint_validator(name: str) -> Validator | None:
    """The named backend's up-front check, which needs no tokenizer (the HTTP side runs it
    before a request is scheduled); None for "none"."""
    if name == "none":
        return None
    from loom.constrain import llguidance_backend, xgrammar_backend
    from loom.constrain.router import first_accepting

    validators = {
        "llguidance": llguidance_backend.validate_constraint,
        "xgrammar": xgrammar_backend.validate_constraint,
    }
    if name != "auto":
        return validators[name]
    return lambda kind, text, lenient: first_accepting(validators, kind, text, lenient)
