"""The xgrammar backend: compile cache and threads, errors, masks, jump-forward."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from loom.constrain.base import GrammarError
from loom.constrain.factory import create_grammar_backend
from loom.constrain.xgrammar_backend import XGrammarBackend, threads_for, validate_constraint
from tests.grammar_helpers import model_vocab_size

PERSON = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)


@pytest.fixture(scope="module")
def tokenizer(grammar_tokenizer):
    return grammar_tokenizer


@pytest.fixture(scope="module")
def backend(xgrammar_backend):
    return xgrammar_backend


def _allowed(bitmask: torch.Tensor, row: int, vocab: int) -> torch.Tensor:
    """Bool mask of allowed ids in one row of a packed int32 bitmask."""
    bits = (bitmask[row].unsqueeze(1) >> torch.arange(32)) & 1
    return bits.flatten()[:vocab].bool()


def _greedy(backend, matcher, tokenizer, seed: int, max_steps: int = 200) -> str:
    """Drive a matcher with masked random logits until it terminates; the text it wrote."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = backend.allocate_bitmask(1)
    ids = []
    for _ in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, backend.vocab_size, generator=gen)
        logits[0, tokenizer.eos_token_id] += 2.0  # let long optional parts end
        backend.apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError(f"no termination in {max_steps} steps: {tokenizer.decode(ids)!r}")


# -- compile cache and threads ---------------------------------------------------------


def test_cache_hit_returns_the_same_compiled_grammar(backend):
    first = backend.get_compiled("regex", "[a-z]+")
    assert backend.get_compiled("regex", "[a-z]+") is first
    assert first.result(timeout=10) is backend.get_compiled("regex", "[a-z]+").result()


def test_each_request_gets_its_own_matcher(backend, tokenizer):
    a = backend.get_matcher("regex", "ab").result(timeout=10)
    b = backend.get_matcher("regex", "ab").result(timeout=10)
    assert a.accept_token(tokenizer.convert_tokens_to_ids("a"))
    assert b.find_jump_forward_string() == "ab"  # b did not move


def test_lru_evicts_the_oldest_key(tokenizer):
    b = XGrammarBackend(tokenizer, model_vocab_size(tokenizer), num_threads=1, cache_size=2)
    try:
        first = b.get_compiled("regex", "a")
        b.get_compiled("regex", "b")
        b.get_compiled("regex", "c")
        assert b.get_compiled("regex", "a") is not first
    finally:
        b.shutdown()


def _blocking_backend(tokenizer, monkeypatch, gate: threading.Event, calls: list, timeout=30.0):
    """A backend whose compiles record their key, then wait for `gate` (which the test sets,
    at the latest when it ends); `calls` gets ("done", kind, text) when one goes on."""
    b = XGrammarBackend(
        tokenizer, model_vocab_size(tokenizer), num_threads=2, compile_timeout=timeout
    )
    real = b._compile

    def slow_compile(kind, text):
        calls.append((kind, text))
        gate.wait()
        calls.append(("done", kind, text))
        return real(kind, text)

    monkeypatch.setattr(b, "_compile", slow_compile)
    return b


def test_compile_runs_off_the_caller_thread_and_once_per_key(tokenizer, monkeypatch):
    gate, calls = threading.Event(), []
    b = _blocking_backend(tokenizer, monkeypatch, gate, calls)
    try:
        futures = [b.get_matcher("regex", "x+") for _ in range(3)]
        assert not any(f.done() for f in futures)  # the caller was not blocked
        gate.set()
        assert all(f.result(timeout=60).find_jump_forward_string() == "x" for f in futures)
        assert calls == [("regex", "x+"), ("done", "regex", "x+")]
    finally:
        gate.set()
        b.shutdown()


def test_compile_timeout_fails_the_callers_future_while_the_worker_is_busy(tokenizer, monkeypatch):
    gate, calls = threading.Event(), []
    b = _blocking_backend(tokenizer, monkeypatch, gate, calls, timeout=0.2)
    try:
        future = b.get_matcher("regex", "y+")
        with pytest.raises(GrammarError, match="longer than 0.2s"):
            future.result(timeout=60)  # a bound against a hang: the limit fires first
        assert calls == [("regex", "y+")]  # the worker is still blocked on the gate
        late = b.get_matcher("regex", "y+")  # the key now fails fast: already failed
        assert late.done()
        with pytest.raises(GrammarError, match="longer than"):
            late.result()
    finally:
        gate.set()
        b.shutdown()


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("regex", "(?=a)b", "Lookahead is not supported"),
        ("regex", "(?<!a)b", "Lookbehind is not supported"),
        ("regex", r"(a)\1", "Backreference is not supported"),
        ("regex", "[a-", r"invalid regex '\[a-'"),
        ("regex", r"a\Z", r"escape \\Z is not supported"),
        ("json_schema", "{'type': 1", "not valid JSON"),
        ("json_schema", '{"type": "strin"}', "not a valid JSON Schema at /type"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("json_schema", '{"type": "integer", "multipleOf": 3}', "uses 'multipleOf' at the"),
        ("json_schema", '{"enum": []}', "enum"),
        ("ebnf", 'root ::= "a" |', "invalid ebnf"),
        ("ebnf", 'start ::= "a"', "invalid ebnf"),
        ("graph", "x", "unknown constraint kind"),
    ],
)
def test_validate_names_the_problem(backend, kind, text, message):
    with pytest.raises(GrammarError, match=message):
        backend.validate(kind, text)


def test_unsupported_keyword_message_names_keyword_and_path():
    schema = {"type": "object", "properties": {"x": {"type": "integer", "not": {"const": 3}}}}
    with pytest.raises(GrammarError) as info:
        validate_constraint("json_schema", json.dumps(schema))
    assert str(info.value) == (
        "json_schema uses 'not' at /properties/x, which loom cannot enforce; remove it "
        "or set json_schema_lenient=true to validate afterwards"
    )


def test_lenient_accepts_unsupported_keywords():
    validate_constraint("json_schema", '{"type": "integer", "multipleOf": 3}', lenient=True)


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("regex", "(?!a)", "invalid regex"),
        ("ebnf", "root ::= (", "invalid ebnf"),
        ("json_schema", "false", "json_schema does not compile"),
    ],
)
def test_compile_errors_fail_the_future(backend, kind, text, message):
    with pytest.raises(GrammarError, match=message):
        backend.get_matcher(kind, text).result(timeout=10)


def test_valid_constraints_pass_validation(backend):
    backend.validate("json_schema", PERSON)
    backend.validate("regex", r"\d{3}-[a-z]+")
    backend.validate("ebnf", 'root ::= "yes" | "no"')
    backend.validate("json_object", "")


# -- masks -----------------------------------------------------------------------------


def test_bitmask_never_allows_padding_ids(backend, tokenizer):
    assert backend.vocab_size > len(tokenizer)
    matcher = backend.get_matcher("json_object", "").result(timeout=10)
    bitmask = backend.allocate_bitmask(2)
    matcher.fill_bitmask(bitmask, 1)
    allowed = _allowed(bitmask, 1, backend.vocab_size)
    assert allowed[: len(tokenizer)].any()
    assert not allowed[len(tokenizer) :].any()


def test_eos_is_the_only_choice_at_the_end_of_a_regex(backend, tokenizer):
    matcher = backend.get_matcher("regex", "ab").result(timeout=10)
    assert all(matcher.accept_token(t) for t in tokenizer.encode("ab"))
    bitmask = backend.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, backend.vocab_size)
    assert allowed.nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


def test_apply_bitmask_only_touches_the_given_rows(backend):
    matcher = backend.get_matcher("regex", "[0-9]+").result(timeout=10)
    bitmask = backend.allocate_bitmask(3)
    matcher.fill_bitmask(bitmask, 1)
    logits = torch.randn(3, backend.vocab_size)
    before = logits.clone()
    backend.apply_bitmask(logits, bitmask, rows=[1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = _allowed(bitmask, 1, backend.vocab_size)
    assert torch.equal(logits[1][allowed], before[1][allowed])
    assert torch.isinf(logits[1][~allowed]).all()


def test_apply_bitmask_masks_logits_wider_than_the_vocab(backend):
    bitmask = backend.allocate_bitmask(2)  # all ones: nothing masked by the grammar
    logits = torch.zeros(2, backend.vocab_size + 40)
    backend.apply_bitmask(logits, bitmask, rows=[0])
    assert torch.isinf(logits[0, backend.vocab_size :]).all()
    assert not torch.isinf(logits[0, : backend.vocab_size]).any()
    assert not torch.isinf(logits[1]).any()


def test_apply_bitmask_handles_logits_narrower_than_the_vocab(backend, tokenizer):
    matcher = backend.get_matcher("regex", "[0-9]+").result(timeout=10)
    bitmask = backend.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, len(tokenizer))
    backend.apply_bitmask(logits, bitmask)
    allowed = _allowed(bitmask, 0, len(tokenizer))
    assert torch.isinf(logits[0][~allowed]).all() and not torch.isinf(logits[0][allowed]).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_on_cuda_matches_cpu(backend, dtype):
    matcher = backend.get_matcher("regex", "[0-9]+").result(timeout=10)
    bitmask = backend.allocate_bitmask(4)
    matcher.fill_bitmask(bitmask, 1)
    matcher.fill_bitmask(bitmask, 3)
    cpu = torch.randn(4, backend.vocab_size + 40).to(dtype)
    cuda = cpu.cuda()
    backend.apply_bitmask(cpu, bitmask, rows=[1, 3])
    backend.apply_bitmask(cuda, bitmask, rows=[1, 3])  # the CPU bitmask moves to the GPU
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.isinf(cpu[1]).any() and not torch.isinf(cpu[0]).any()


@pytest.mark.parametrize("seed", range(5))
def test_regex_driven_by_random_logits_fullmatches(backend, tokenizer, seed):
    pattern = r"(\d{3})-[a-z]{2,5}( [A-Z][a-z]{0,6})?"
    matcher = backend.get_matcher("regex", pattern).result(timeout=10)
    assert re.fullmatch(pattern, _greedy(backend, matcher, tokenizer, seed))


def test_rollback_restores_the_previous_state(backend, tokenizer):
    matcher = backend.get_matcher("regex", "abc|abd").result(timeout=10)
    ids = tokenizer.encode("ab")
    assert all(matcher.accept_token(t) for t in ids)
    matcher.rollback(len(ids))
    assert matcher.find_jump_forward_string() == "ab"


def test_whitespace_between_json_elements_is_free_as_in_json(backend):
    # Loops on whitespace are the sampler's to stop (test_whitespace_guard.py).
    matcher = backend.get_matcher("json_object", "").result(timeout=10)
    assert matcher.accept_string("{" + " \n" * 200 + '"a"' + "\t" * 50 + ": 1}")


def test_declared_key_spelled_with_escapes_is_refused(backend):
    # "\u006eame" is "name": as an extra key it would skip the declared value's schema
    matcher = backend.get_matcher("json_schema", PERSON).result(timeout=10)
    assert not matcher.accept_string('{"\\u006eame"')


# -- jump-forward ----------------------------------------------------------------------


def test_jump_forward_string_of_fixed_keys_contains_the_key(backend):
    matcher = backend.get_matcher("json_schema", PERSON).result(timeout=10)
    assert matcher.find_jump_forward_string() == "{"
    assert matcher.accept_string('{"')
    assert "name" in matcher.find_jump_forward_string()
    assert matcher.accept_string('name": "Al", "')
    assert "age" in matcher.find_jump_forward_string()


# -- factory ---------------------------------------------------------------------------


def test_factory(tokenizer):
    assert create_grammar_backend("none", tokenizer, 100) is None
    backend = create_grammar_backend("xgrammar", tokenizer, model_vocab_size(tokenizer))
    assert isinstance(backend, XGrammarBackend)
    backend.shutdown()
    with pytest.raises(ValueError, match="unknown grammar backend"):
        create_grammar_backend("outlines", tokenizer, 100)


def test_fill_threads_grow_with_the_rows_up_to_the_limit():
    # A fill's threads start and join every step: a few rows are filled on one thread.
    assert [threads_for(rows, 8) for rows in (1, 4, 7, 8, 16, 32, 256)] == [1, 1, 1, 2, 4, 8, 8]
    assert threads_for(256, 1) == 1
