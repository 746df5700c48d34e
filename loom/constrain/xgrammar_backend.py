"""The xgrammar grammar backend: compile constraints off-thread, mask logits on device.

JSON-schema compile choices (xgrammar 0.2.8):
- strict_mode=True. Where a schema says nothing about extra keys or extra array items,
  the grammar allows none. JSON Schema would allow them, so this forbids some valid
  outputs, but every output still validates, and models do not wander into invented
  keys. It is also required for honesty: with extra keys open, a declared key written
  with escapes ("\\u0061" for "a") passes as an extra key and skips its own schema, and
  a repeat overrides the declared value after parsing. So schema_check rejects an open
  `additionalProperties` beside `properties`, and strict mode closes the default case.
  Strict mode also narrows two corners: an array with maxItems but no `items` may only
  be empty, and minProperties without `properties` does not compile.
- any_order=False: properties come in the schema's declared order. Any order would drop
  the checks that required keys are present and keys do not repeat.
- Whitespace between elements is free and unbounded (any_whitespace), as JSON allows. A
  counted cap (max_whitespace_cnt) made the mask of every state between elements several
  times slower to compute (benchmarks/RESULTS.md); a model looping on whitespace is
  stopped by the sampler instead (whitespace.py).
- xgrammar's grammar for strings with minLength / maxLength lets raw control characters
  through (invalid JSON); `_close_control_chars` patches the generated grammar.
- Other formatting the grammar fixes: integers are written without a fraction (1, not
  1.0), const / enum objects and arrays only in xgrammar's compact spelling.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from typing import Any

import torch
import xgrammar as xgr

from loom.constrain.base import GrammarBackend, GrammarError, GrammarMatcher, default_mask_threads
from loom.constrain.compile_cache import CompileCache, then
from loom.constrain.schema_check import check_schema
from loom.constrain.schema_normalize import for_grammar
from loom.constrain.xgrammar_quirks import find_literal_escape

KINDS = ("json_schema", "regex", "ebnf", "json_object")
_JSON_OBJECT_SCHEMA = '{"type": "object"}'


class XGrammarMatcher(GrammarMatcher):
    """One request's position in its grammar (a thin wrapper: the hot path stays in C++).
    Whether it terminated is kept here: it changes only when a stop token is accepted or
    tokens are rolled back, and the scheduler asks every step for every row."""

    __slots__ = ("_matcher", "_stops", "_terminated")

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int] | None):
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self._stops = frozenset(self._matcher.stop_token_ids)
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        ok = self._matcher.accept_token(token_id)
        if ok and token_id in self._stops:
            self._terminated = self._matcher.is_terminated()
        return ok

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)
            self._terminated = self._matcher.is_terminated()

    def find_jump_forward_string(self) -> str:
        return self._matcher.find_jump_forward_string()

    def accept_string(self, text: str) -> bool:
        """Advance by raw text (tests)."""
        ok = self._matcher.accept_string(text)
        self._terminated = self._matcher.is_terminated()
        return ok


class XGrammarBackend(GrammarBackend):
    """Compiles constraints in a thread pool, caches them (CompileCache), and masks."""

    name = "xgrammar"
    matcher_type = XGrammarMatcher

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
        # vocab_size is the model's logits width: ids past len(tokenizer) are padding
        # and xgrammar never allows them.
        self.vocab_size = vocab_size
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._stop_token_ids = stop_token_ids
        # Our own bounded LRU replaces xgrammar's cache, which is unbounded by default.
        self._compiler = xgr.GrammarCompiler(
            self._info, max_threads=num_threads, cache_enabled=False
        )
        self._cache = CompileCache(
            lambda kind, text: self._compile(kind, text),
            _describe,
            num_threads=num_threads,
            timeout=compile_timeout,
            size=cache_size,
            thread_name="loom-xgrammar",
        )
        # Fills a step's masks on its own threads, without the GIL: one batch matcher per
        # thread count, the count chosen by the step's rows (threads_for).
        self._max_threads = mask_threads or default_mask_threads()
        self._batches: dict[int, xgr.BatchGrammarMatcher] = {}

    # -- validation -------------------------------------------------------------------

    def validate(self, kind: str, text: str, lenient: bool = False) -> None:
        validate_constraint(kind, text, lenient)

    # -- compilation ------------------------------------------------------------------

    def get_matcher(self, kind: str, text: str, lenient: bool = False) -> Future[GrammarMatcher]:
        # xgrammar drops what it cannot enforce by itself: lenient compiles the same.
        return then(
            self.get_compiled(kind, text),
            lambda compiled: XGrammarMatcher(compiled, self._stop_token_ids),
            lambda e: f"cannot start a matcher: {xgrammar_reason(e)}",
        )

    def get_compiled(self, kind: str, text: str) -> Future[xgr.CompiledGrammar]:
        """The shared compile future of (kind, text); a cache hit returns the same one."""
        return self._cache.get(kind, text)

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        if kind == "json_schema" or kind == "json_object":
            schema = text if kind == "json_schema" else _JSON_OBJECT_SCHEMA
            return self._compiler.compile_grammar(json_schema_grammar(schema))
        if kind == "regex":
            _check_escapes(text)
            return self._compiler.compile_regex(text)
        if kind == "ebnf":
            return self._compiler.compile_grammar(text)
        raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {KINDS}")

    # -- masks ------------------------------------------------------------------------

    def fill_bitmasks(
        self, matchers: list[GrammarMatcher], rows: list[int], bitmask: torch.Tensor
    ) -> None:
        inner = [m._matcher for m in matchers]  # type: ignore[attr-defined]
        threads = threads_for(len(rows), self._max_threads)
        if threads not in self._batches:
            self._batches[threads] = xgr.BatchGrammarMatcher(threads)
        self._batches[threads].batch_fill_next_token_bitmask(inner, bitmask, rows)

    def shutdown(self) -> None:
        self._cache.shutdown()
        super().shutdown()


# Rows one fill thread takes at least: a call's threads start and join every step, which
# costs more than a few rows' fill. Measured on the H200 machine's 16 virtual cores
# (xgrammar's BatchGrammarMatcher called directly, person-schema states, Llama-3
# vocabulary; benchmarks/RESULTS.md, 2026-12-03 session 9): one row took
# 61 us on one thread and 412 us on 15; 16 rows were fastest on 4 threads (222 us), 32 on
# 8 (385 us), and 8 threads were as fast as 15 at 256 rows (1.26 ms).
ROWS_PER_THREAD = 4


def threads_for(rows: int, max_threads: int) -> int:
    """Fill threads for a step of `rows` rows: one per ROWS_PER_THREAD rows, at most
    max_threads."""
    return max(1, min(max_threads, rows // ROWS_PER_THREAD))


def validate_constraint(kind: str, text: str, lenient: bool = False) -> None:
    """The up-front check of one constraint, without a tokenizer: raises GrammarError
    naming the problem. Cheap: it builds xgrammar's grammar but no token masks."""
    if kind == "json_object":
        return
    if not isinstance(text, str):
        raise GrammarError(f"{kind} must be a string")
    try:
        if kind == "json_schema":
            _check_pattern_repeats(check_schema(text, lenient))
            json_schema_grammar(text)
        elif kind == "regex":
            _check_escapes(text)
            xgr.Grammar.from_regex(text)
        elif kind == "ebnf":
            xgr.Grammar.from_ebnf(text)
        else:
            raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {KINDS}")
    except GrammarError:
        raise
    except Exception as e:  # xgrammar's parse errors are RuntimeError subclasses
        raise GrammarError(_describe(kind, text, e)) from e


# xgrammar 0.2.8 converts a JSON-schema `pattern` in time quadratic in its counted
# repetition bounds ({0,3000}: 0.5 s; {0,30000}: minutes), and validation runs it in the
# request's path: larger bounds are refused up front.
MAX_PATTERN_REPEAT = 1000
_COUNTED_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


def _check_pattern_repeats(node: Any, path: str = "") -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_pattern_repeats(item, f"{path}/{i}")
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str):
            bounds = [int(n) for m in _COUNTED_REPEAT.finditer(value) for n in m.groups() if n]
            if max(bounds, default=0) > MAX_PATTERN_REPEAT:
                raise GrammarError(
                    f"json_schema pattern at {path or 'the schema root'} repeats up to "
                    f"{max(bounds)} times; loom allows {MAX_PATTERN_REPEAT} (compile cost)"
                )
        else:
            _check_pattern_repeats(value, f"{path}/{key}")


def _check_escapes(regex: str) -> None:
    escape = find_literal_escape(regex)
    if escape:
        raise GrammarError(f"invalid regex {regex!r}: escape {escape} is not supported")


def _describe(kind: str, text: str, error: BaseException) -> str:
    what = {"regex": f"invalid regex {text!r}", "ebnf": "invalid ebnf"}.get(kind)
    return f"{what or kind + ' does not compile'}: {xgrammar_reason(error)}"


def json_schema_grammar(schema_text: str) -> xgr.Grammar:
    grammar = xgr.Grammar.from_json_schema(
        json.dumps(for_grammar(json.loads(schema_text), expand=False)),
        any_whitespace=True,
        strict_mode=True,
        any_order=False,
    )
    return _close_control_chars(grammar)


# xgrammar 0.2.8 writes the characters of a length-limited string as [^\"\\\r\n], which
# admits raw control characters (invalid inside a JSON string); ordinary strings exclude
# \0-\x1f. Excluding them here only removes outputs that were not JSON anyway.
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def _close_control_chars(grammar: xgr.Grammar) -> xgr.Grammar:
    ebnf = str(grammar)
    if _LOOSE_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def xgrammar_reason(error: BaseException) -> str:
    """xgrammar's message without its '[time] file.cc:line:' prefix."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    return _LOG_PREFIX.sub("", reason).strip()
