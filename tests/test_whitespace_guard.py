"""The sampler's stop for whitespace loops in JSON output (loom/constrain/whitespace.py):
the grammars allow any whitespace between JSON elements, and a model that keeps choosing
whitespace is made to write something else after MAX_RUN whitespace-only tokens."""

from __future__ import annotations

import json

import torch

from loom.constrain import bitmask as masks
from loom.constrain.whitespace import MAX_RUN, WhitespaceGuard, whitespace_token_ids
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.sampling import StepSampler
from tests.grammar_helpers import model_vocab_size


def only(tokenizer, text: str) -> int:
    (token,) = tokenizer.encode(text)
    return token


def test_whitespace_tokens_are_those_of_json_whitespace_only(grammar_tokenizer):
    tokenizer = grammar_tokenizer
    vocab = model_vocab_size(tokenizer)
    ids = whitespace_token_ids(tokenizer, vocab)
    assert only(tokenizer, "\n") in ids and only(tokenizer, " ") in ids
    for token in ids:
        assert set(tokenizer.decode([token])) <= set(" \t\n\r")
    others = set(range(len(tokenizer))) - set(ids)
    assert all(set(tokenizer.decode([t])) - set(" \t\n\r") for t in others if tokenizer.decode([t]))


def test_restrict_removes_whitespace_unless_nothing_else_is_left(grammar_tokenizer):
    tokenizer = grammar_tokenizer
    vocab = model_vocab_size(tokenizer)
    space, brace = only(tokenizer, " "), only(tokenizer, "}")
    guard = WhitespaceGuard([space], vocab)
    bitmask = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    for row, tokens in enumerate(([space, brace], [space])):
        for t in tokens:
            bitmask[row, t // 32] |= 1 << (t % 32)
    guard.restrict(bitmask, [0, 1])
    logits = torch.zeros(2, vocab)
    masks.apply(logits, bitmask, vocab)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [brace]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [space]  # kept: only choice


def test_a_run_is_the_last_max_run_tokens_all_whitespace(grammar_tokenizer):
    tokenizer = grammar_tokenizer
    space, a = only(tokenizer, " "), only(tokenizer, "a")
    guard = WhitespaceGuard([space], model_vocab_size(tokenizer))
    assert guard.looping([a] + [space] * MAX_RUN)
    assert not guard.looping([space] * (MAX_RUN - 1))
    assert not guard.looping([space] * MAX_RUN + [a])


def _decode_loop(backend, tokenizer, guard, steps: int) -> list[int]:
    """Greedy JSON-object decoding by a 'model' that always prefers a newline, then a
    closing brace, then an opening one, then anything else: its tokens in `steps` steps."""
    vocab = model_vocab_size(tokenizer)
    newline, close, open_ = only(tokenizer, "\n"), only(tokenizer, "}"), only(tokenizer, "{")
    req = Req("r0", [1], SamplingParams(temperature=0, max_new_tokens=steps, json_object=True))
    req.req_pool_idx = 0
    req.grammar = backend.get_matcher("json_object", "").result(timeout=10)
    sampler = StepSampler(backend, vocab, {tokenizer.eos_token_id}, 2, "cpu", guard)
    logits = torch.linspace(0, 1, vocab).repeat(1, 1)
    logits[0, newline], logits[0, close], logits[0, open_] = 10.0, 5.0, 4.0
    for _ in range(steps):
        if req.grammar.is_terminated():
            break
        (token,) = sampler.queue([req], logits.clone()).read()
        req.pending -= 1
        assert req.grammar.accept_token(token)
        req.output_ids.append(token)
    return req.output_ids


def test_a_model_looping_on_newlines_is_made_to_close_the_object(
    xgrammar_backend, grammar_tokenizer
):
    backend, tokenizer = xgrammar_backend, grammar_tokenizer
    guard = WhitespaceGuard.for_tokenizer(tokenizer, model_vocab_size(tokenizer))
    out = _decode_loop(backend, tokenizer, guard, steps=40)
    assert out[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(out[:-1])
    assert json.loads(text) == {}
    assert set(text) == {"{", "}", "\n"}
    # at most MAX_RUN whitespace-only tokens in a row before the guard takes them away
    run = longest = 0
    for token in out:
        run = run + 1 if token in guard.token_ids else 0
        longest = max(longest, run)
    assert longest == MAX_RUN


def test_without_the_guard_the_same_model_loops(xgrammar_backend, grammar_tokenizer):
    backend, tokenizer = xgrammar_backend, grammar_tokenizer
    out = _decode_loop(backend, tokenizer, None, steps=40)
    assert len(out) == 40 and set(tokenizer.decode(out)) == {"{", "\n"}  # never closes
