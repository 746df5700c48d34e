"""The llguidance grammar backend: JSON schema, regex and Lark grammars, masks filled in
parallel by llguidance's own threads (no GIL).

Compile choices (llguidance 1.9):
- A schema compiles once per (kind, text) into a matcher that each request deep-copies
  (a copy takes microseconds; building the lexer can take milliseconds).
- Whitespace between elements is free and unbounded, as with xgrammar; the sampler stops
  a model looping on it (whitespace.py).
- Strict by default, as xgrammar: objects and tuples the schema leaves open are closed
  (strictness.close_schema); a non-strict request comes with them opened explicitly
  (strictness.open_schema), and undeclared keys are then allowed. A declared key
  written with escapes ("\\u0061" for "a") would pass as an undeclared key and skip its
  own schema, so the `\\u` and `\\/` escapes are not allowed in JSON strings: every
  character then has one spelling. The cost: strings cannot hold the control characters
  that only \\u spells (U+0000-U+001F but \\b \\f \\n \\r \\t).
- Properties come in the schema's declared order (llguidance's own rule).
- What llguidance does not enforce soundly is refused up front (schema_check's
  llguidance rules), or, with `json_schema_lenient`, validated afterwards.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from loom.constrain.base import GrammarBackend, GrammarError, GrammarMatcher, default_mask_threads
from loom.constrain.compile_cache import CompileCache, then
from loom.constrain.schema_check import check_schema
from loom.constrain.schema_normalize import for_grammar
from loom.constrain.strictness import close_schema

KINDS = ("json_schema", "regex", "ebnf", "json_object")
_LENIENT_SCHEMA = "json_schema (lenient)"  # the cache key kind of a lenient schema
_ESCAPES = '"\\bfnrt'  # JSON escapes but \u and \/ (see the module docstring)


JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": True, "json_allowed_escapes": _ESCAPES}


class LLGuidanceMatcher(GrammarMatcher):
    """One request's copy of a compiled matcher. Terminated means what it means for
    xgrammar: a stop token was accepted (llguidance stops as soon as nothing but a stop
    token can follow)."""

    __slots__ = ("_matcher", "_stop_ids", "_ended")

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: frozenset[int]):
        self._matcher = matcher
        self._stop_ids = stop_ids
        self._ended = False

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id in self._stop_ids:
            # Once stopped, llguidance takes a stop token only through consume_token.
            self._ended = self._matcher.is_accepting() and self._matcher.consume_token(token_id)
            return self._ended
        # try_consume leaves the state as it was when the token is refused; a refused
        # consume_token would put the matcher in a permanent error state.
        return self._matcher.try_consume_tokens([token_id]) == 1

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._ended

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)
            self._ended = False

    def find_jump_forward_string(self) -> str:
        forced = self._matcher.compute_ff_bytes()
        try:
            return forced.decode()
        except UnicodeDecodeError as e:  # a character cut at the end waits for its rest
            return forced[: e.start].decode()


class LLGuidanceBackend(GrammarBackend):
    """Compiles constraints in a thread pool, caches them (CompileCache), and masks."""

    name = "llguidance"
    matcher_type = LLGuidanceMatcher

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        num_threads: int = 4,
        compile_timeout: float = 30.0,
        cache_size: int = 256,
        stop_token_ids: list[int] | None = None,
        mask_threads: int | None = None,
    ):
        self.vocab_size = vocab_size
        eos = stop_token_ids or [tokenizer.eos_token_id]
        self._stop_ids = frozenset(eos)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._cache = CompileCache(
            lambda kind, text: self._compile(kind, text),
            lambda kind, text, e: f"{kind} does not compile: {e}",
            num_threads=num_threads,
            timeout=compile_timeout,
            size=cache_size,
            thread_name="loom-llguidance",
        )
        self._executor = llguidance.LLExecutor(mask_threads or default_mask_threads())

    def validate(self, kind: str, text: str, lenient: bool = False) -> None:
        validate_constraint(kind, text, lenient)

    def get_matcher(self, kind: str, text: str, lenient: bool = False) -> Future[GrammarMatcher]:
        if lenient and kind == "json_schema":
            kind = _LENIENT_SCHEMA
        return then(
            self._cache.get(kind, text),
            lambda proto: LLGuidanceMatcher(proto.deep_copy(), self._stop_ids),
            lambda e: f"cannot start a matcher: {e}",
        )

    def _compile(self, kind: str, text: str) -> llguidance.LLMatcher:
        grammar = grammar_text(kind, text)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{kind} does not compile: {matcher.get_error()}")
        return matcher

    def fill_bitmasks(
        self, matchers: list[GrammarMatcher], rows: list[int], bitmask: torch.Tensor
    ) -> None:
        pairs = [(m._matcher, row) for m, row in zip(matchers, rows)]  # type: ignore[attr-defined]
        llguidance.torch.fill_next_token_bitmask_par(self._executor, pairs, bitmask)

    def shutdown(self) -> None:
        self._cache.shutdown()
        super().shutdown()


def grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar for a constraint (not yet checked)."""
    options = dict(JSON_OPTIONS)
    if kind in ("json_schema", _LENIENT_SCHEMA):
        # lenient: unimplemented keywords are dropped, the output validated afterwards
        options["lenient"] = kind == _LENIENT_SCHEMA
        schema = for_grammar(close_schema(_parse(text)))
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', overrides=options
        )
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "ebnf":
        return llguidance.grammar_from("gbnf", text)
    raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {KINDS}")


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from e


def validate_constraint(kind: str, text: str, lenient: bool = False) -> None:
    """The up-front check of one constraint, without a tokenizer: raises GrammarError
    naming the problem."""
    if kind == "json_object":
        return
    if not isinstance(text, str):
        raise GrammarError(f"{kind} must be a string")
    if kind == "json_schema":
        check_schema(text, lenient, backend="llguidance")
        kind = _LENIENT_SCHEMA if lenient else kind
    try:
        grammar = grammar_text(kind, text)
    except ValueError as e:
        raise GrammarError(f"{kind} does not compile: {e}") from e
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"{_what(kind, text)}: {error}")


def _what(kind: str, text: str) -> str:
    if kind == "regex":
        return f"invalid regex {text!r}"
    if kind.startswith("json_schema"):
        return "json_schema does not compile"
    return f"{kind} does not compile"
