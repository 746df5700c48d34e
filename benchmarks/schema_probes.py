"""Grammar backends as bench_schema_coverage.py sees them, each in a worker process.

A probe compiles one JSON schema (or raises Refused with the backend's message) and says
where, if anywhere, a token sequence followed by the stop token stops matching. Probes run in a
spawned worker so that a compile past its time limit, or a backend that crashes, costs a
restarted worker and not the whole run.

Probes: every name in loom's factory (through loom's GrammarBackend interface: validate,
get_matcher, accept_token, is_terminated), "auto-non-strict" (the default choice for a
request with json_schema_strict=False: the schema as SamplingParams sends it, with JSON
Schema's defaults for extra keys and items written out), and two references with no loom
checks:
"xgrammar-stock" (xgr.Grammar.from_json_schema defaults) and "llguidance-stock"
(LLMatcher.grammar_from_json_schema defaults).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, Protocol

STOCK = ("xgrammar-stock", "llguidance-stock")
NON_STRICT = "auto-non-strict"
_WARM_UP_SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
OPEN_TIMEOUT_S = 600.0  # building a backend for a 128k vocabulary takes seconds
MATCH_TIMEOUT_S = 120.0  # feeding a schema's instances, once it compiled


class Refused(Exception):
    """The backend will not compile the schema; the message is the backend's own."""


class Probe(Protocol):
    def compile(self, schema_text: str) -> None: ...

    def match(self, tokens: Sequence[int]) -> Match: ...


class Match(NamedTuple):
    """One instance fed to a matcher."""

    tokens: int  # how many (the stop token not counted)
    # None: every token, then the stop token, accepted and the matcher ended; else the
    # index of the first refused token, `tokens` when it was the stop token (or the end)
    refused_at: int | None
    ended_before_stop: bool  # the matcher said it was terminated before the stop token


def feed(
    accept: Callable[[int], bool], tokens: Sequence[int], eos: int, ended: Callable[[], bool]
) -> Match:
    for i, token in enumerate(tokens):
        if not accept(token):
            return Match(len(tokens), i, False)
    early = ended()
    return Match(len(tokens), None if accept(eos) and ended() else len(tokens), early)


@dataclass(frozen=True)
class TokenizerSpec:
    path: str
    vocab_size: int  # the logits width loom's backends are built for
    eos_id: int


class LoomProbe:
    """A loom grammar backend, only through the interface the scheduler uses."""

    def __init__(self, name: str, tokenizer: Any, spec: TokenizerSpec, compile_timeout: float):
        from loom.constrain.factory import create_grammar_backend
        from loom.constrain.strictness import open_schema_text

        self._as_sent = open_schema_text if name == NON_STRICT else (lambda text: text)
        self._backend = create_grammar_backend(
            "auto" if name == NON_STRICT else name,
            tokenizer,
            spec.vocab_size,
            compile_timeout=compile_timeout,
            stop_token_ids=[spec.eos_id],
        )
        if self._backend is None:
            raise ValueError(f"loom backend {name!r} constrains nothing")
        self._eos = spec.eos_id
        self._timeout = compile_timeout
        self._schema = ""

    def compile(self, schema_text: str) -> None:
        from loom.constrain.base import GrammarError

        schema_text = self._schema = self._as_sent(schema_text)
        try:
            self._backend.validate("json_schema", schema_text)
            self._backend.get_matcher("json_schema", schema_text).result(self._timeout + 1)
        except GrammarError as e:
            raise Refused(str(e)) from e
        except TimeoutError as e:  # the backend's own timer should have fired first
            raise Refused(f"compile took longer than {self._timeout:g}s") from e

    def match(self, tokens: Sequence[int]) -> Match:
        # A fresh matcher per instance: the compile is cached by (kind, text).
        matcher = self._backend.get_matcher("json_schema", self._schema).result()
        return feed(matcher.accept_token, tokens, self._eos, matcher.is_terminated)


class XGrammarStockProbe:
    """Stock xgrammar: Grammar.from_json_schema with its defaults, no loom checks."""

    def __init__(self, tokenizer: Any, spec: TokenizerSpec):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=spec.vocab_size, stop_token_ids=[spec.eos_id]
        )
        # Caching off: every schema is compiled once, and the cache is unbounded.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._eos = spec.eos_id
        self._compiled: Any = None

    def compile(self, schema_text: str) -> None:
        self._compiled = None
        try:
            grammar = self._xgr.Grammar.from_json_schema(schema_text)
            self._compiled = self._compiler.compile_grammar(grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses
            raise Refused(_last_line(e)) from e

    def match(self, tokens: Sequence[int]) -> Match:
        matcher = self._xgr.GrammarMatcher(self._compiled)
        return feed(matcher.accept_token, tokens, self._eos, matcher.is_terminated)


class LLGuidanceStockProbe:
    """Stock llguidance: LLMatcher.grammar_from_json_schema with its defaults.

    Its matcher builds lexer states lazily, as tokens arrive, so its compile time is not
    comparable with xgrammar's (which precomputes token masks)."""

    def __init__(self, tokenizer: Any, spec: TokenizerSpec):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=spec.vocab_size, eos_token=spec.eos_id
        )
        self._eos = spec.eos_id
        self._initial: Any = None

    def compile(self, schema_text: str) -> None:
        self._initial = None
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(schema_text)
        except ValueError as e:
            raise Refused(str(e)) from e
        matcher = self._ll.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise Refused(matcher.get_error())
        self._initial = matcher

    def match(self, tokens: Sequence[int]) -> Match:
        matcher = self._initial.deep_copy()  # an error state is final: copy per instance
        ended = lambda: matcher.is_stopped() and not matcher.is_error()  # noqa: E731
        return feed(matcher.consume_token, tokens, self._eos, ended)


def make_probe(name: str, tokenizer: Any, spec: TokenizerSpec, compile_timeout: float) -> Probe:
    if name == "xgrammar-stock":
        return XGrammarStockProbe(tokenizer, spec)
    if name == "llguidance-stock":
        return LLGuidanceStockProbe(tokenizer, spec)
    return LoomProbe(name, tokenizer, spec, compile_timeout)


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# -- the worker ------------------------------------------------------------------------


def serve(conn: Connection, tokenizer_path: str, compile_timeout: float, quiet: bool) -> None:
    """The worker loop. It answers its start with ("ready", TokenizerSpec, loom's backend
    names or why loom's factory does not import). Then, messages in: ("open", name) and
    ("case", schema_text, [instance text, ...]). Out: ("opened", None) | ("error", why);
    per case ("compiled", ms, refusal or None), then, when it compiled, ("matched",
    [Match, ...])."""
    if quiet:  # xgrammar and llguidance log conversion warnings on stderr, per schema
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    spec = TokenizerSpec(tokenizer_path, len(tokenizer), tokenizer.eos_token_id)
    conn.send(("ready", spec, loom_backend_names()))
    probe: Probe | None = None
    while True:
        message = conn.recv()
        if message[0] == "open":
            probe = None
            try:
                probe = make_probe(message[1], tokenizer, spec, compile_timeout)
                probe.compile(_WARM_UP_SCHEMA)  # first-use costs are not a schema's
                probe.match([])
            except Exception as e:
                probe = None
                conn.send(("error", f"{type(e).__name__}: {e}"))
            else:
                conn.send(("opened", None))
        elif message[0] == "case" and probe is not None:
            _, schema_text, texts = message
            instances = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
            start = time.perf_counter()
            try:
                probe.compile(schema_text)
                refusal = None
            except Refused as e:
                refusal = str(e) or "refused"
            except Exception as e:  # a backend bug, not a refusal it meant
                refusal = f"{type(e).__name__} raised: {e}"
            conn.send(("compiled", (time.perf_counter() - start) * 1000, refusal))
            if refusal is None:
                conn.send(("matched", [probe.match(tokens) for tokens in instances]))


def loom_backend_names() -> list[str] | str:
    """The grammar backends loom's factory lists, or why it does not import (mid-edit)."""
    try:
        from loom.constrain.factory import BACKENDS
    except Exception as e:
        return f"loom's factory does not import ({type(e).__name__}: {e})"
    return [name for name in BACKENDS if name != "none"] + [NON_STRICT]


@dataclass(frozen=True)
class Outcome:
    compile_ms: float | None
    refusal: str | None  # None: compiled; "timeout", "crash ..." or the backend's message
    matched: list[Match] | None  # per instance, when it compiled


class Worker:
    """A spawned process that measures one backend at a time; after a timeout or a crash
    it is restarted and the backend reopened."""

    def __init__(self, tokenizer_path: str, compile_timeout: float, quiet: bool):
        self._args = (tokenizer_path, compile_timeout, quiet)
        self._compile_timeout = compile_timeout
        self._process: Any = None
        self._conn: Connection | None = None
        self._backend: str | None = None

    def start(self) -> tuple[TokenizerSpec, list[str] | str]:
        """Start the process; the tokenizer it loaded, and loom's backend names (or why
        there are none)."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=serve, args=(child, *self._args), daemon=True)
        self._process.start()
        child.close()
        reply = self._receive(OPEN_TIMEOUT_S)
        if reply is None:
            self.close()
            raise RuntimeError("the worker process did not start (run with --verbose)")
        return reply[1], reply[2]

    def open(self, backend: str) -> str | None:
        """Build the backend in the worker; None, or why it cannot be measured."""
        if self._conn is None:
            self.start()
        assert self._conn is not None
        self._backend = backend
        self._conn.send(("open", backend))
        reply = self._receive(OPEN_TIMEOUT_S)
        if reply is None:
            self.close()
            return "the worker died building it"
        return reply[1] if reply[0] == "error" else None

    def run(self, schema_text: str, texts: list[str]) -> Outcome:
        if self._conn is None:  # restarted after a timeout or a crash
            assert self._backend is not None
            error = self.open(self._backend)
            if error is not None:
                return Outcome(None, f"crash (cannot restart the backend: {error})", None)
        assert self._conn is not None
        self._conn.send(("case", schema_text, texts))
        # The worker is idle when the case is sent, so this deadline is the compile's own
        # (tokenizing the instances first takes milliseconds).
        reply = self._receive(self._compile_timeout + 1)
        if reply is None:
            return self._fail(None, "timeout")
        _, ms, refusal = reply
        if refusal is not None:
            if "took longer than" in refusal:  # loom's timer: a thread is still compiling
                self.close()
            return Outcome(ms, refusal, None)
        reply = self._receive(MATCH_TIMEOUT_S)
        if reply is None:
            return self._fail(ms, "timeout (matching instances)")
        if ms > self._compile_timeout * 1000:  # it finished within the grace second
            return Outcome(ms, "timeout", None)
        return Outcome(ms, None, reply[1])

    def _fail(self, ms: float | None, why: str) -> Outcome:
        crashed = self._process is not None and not self._process.is_alive()
        code = self._process.exitcode if crashed else None
        self.close()
        return Outcome(ms, f"crash (exit code {code})" if crashed else why, None)

    def _receive(self, timeout: float) -> Any:
        """The next message, or None when the worker died or missed the deadline."""
        assert self._conn is not None
        try:
            return self._conn.recv() if self._conn.poll(timeout) else None
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
