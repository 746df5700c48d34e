"""The llguidance backend, the `auto` router over both backends, and the masks of a step
filled together: the contracts the scheduler relies on, whichever backend holds a row."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loom.constrain.base import GrammarError
from loom.constrain.factory import constraint_validator, create_grammar_backend
from loom.constrain.llguidance_backend import LLGuidanceMatcher
from loom.constrain.xgrammar_backend import XGrammarMatcher
from tests.grammar_helpers import make_tokenizer, model_vocab_size, random_walk

PERSON = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)
# patternProperties: llguidance enforces it, loom's xgrammar checks refuse it.
TAGGED = json.dumps(
    {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "maxProperties": 2}
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backends(tokenizer):
    made = {
        name: create_grammar_backend(
            name, tokenizer, model_vocab_size(tokenizer), num_threads=2, mask_threads=2
        )
        for name in ("xgrammar", "llguidance", "auto")
    }
    yield made
    for backend in made.values():
        backend.shutdown()


def _walked(backend, kind: str, text: str, tokenizer, steps: int, seed: int):
    """A matcher moved `steps` random allowed tokens into its grammar."""
    matcher = backend.get_matcher(kind, text).result(timeout=30)
    gen = torch.Generator().manual_seed(seed)
    bitmask = backend.allocate_bitmask(1)
    for _ in range(steps):
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.rand(1, backend.vocab_size, generator=gen)
        logits[0, tokenizer.eos_token_id] = -1.0  # keep going
        backend.apply_bitmask(logits, bitmask)
        assert matcher.accept_token(int(logits.argmax()))
    return matcher


def test_the_router_sends_each_constraint_to_the_backend_that_enforces_it(backends):
    auto = backends["auto"]
    assert auto.choose("json_schema", PERSON).name == "xgrammar"
    assert auto.choose("json_schema", TAGGED).name == "llguidance"
    assert auto.choose("regex", "[a-z]+").name == "xgrammar"
    assert auto.choose("ebnf", 'root ::= "yes" | "no"').name == "xgrammar"


def _upper_then_lower(text: str) -> bool:  # \p{Lu}[a-z]{0,6}; Python's re has no \p
    return len(text) > 0 and text[0].isupper() and re.fullmatch("[a-z]{0,6}", text[1:])


@pytest.mark.parametrize(
    "regex, matches",
    [
        (r"(?i)yes|no", lambda t: re.fullmatch(r"(?i)yes|no", t)),
        (r"(?P<word>[a-z]{1,8})!", lambda t: re.fullmatch(r"(?P<word>[a-z]{1,8})!", t)),
        (r"\p{Lu}[a-z]{0,6}", _upper_then_lower),
    ],
)
def test_regex_features_xgrammar_lacks_go_to_llguidance(backends, tokenizer, regex, matches):
    auto = backends["auto"]
    assert auto.choose("regex", regex).name == "llguidance"
    for seed in range(3):
        text = random_walk(auto, auto.get_matcher("regex", regex).result(30), tokenizer, seed)
        assert text is not None and matches(text), text


@pytest.mark.parametrize(
    "regex, feature",
    [(r"(?=a)b", "Lookahead"), (r"(a)\1", "Backreference"), (r"\bab\b", "Word boundary")],
)
def test_regex_features_no_backend_has_are_refused_by_name(backends, regex, feature):
    with pytest.raises(GrammarError, match=feature):
        backends["auto"].validate("regex", regex)


def test_xgrammar_alone_refuses_what_the_router_accepts_naming_the_keyword(backends):
    with pytest.raises(GrammarError, match="patternProperties"):
        backends["xgrammar"].validate("json_schema", TAGGED)
    backends["auto"].validate("json_schema", TAGGED)
    constraint_validator("auto")("json_schema", TAGGED, False)
    with pytest.raises(GrammarError, match="patternProperties"):
        constraint_validator("xgrammar")("json_schema", TAGGED, False)


def test_a_schema_no_backend_enforces_is_refused_with_a_keyword(backends):
    odd = json.dumps({"type": "integer", "not": {"const": 3}})
    for name in ("auto", "llguidance", "xgrammar"):
        with pytest.raises(GrammarError, match="not"):
            backends[name].validate("json_schema", odd)


@pytest.mark.parametrize("name", ["xgrammar", "llguidance"])
def test_parallel_fill_writes_what_each_matcher_writes_alone(backends, tokenizer, name):
    backend = backends[name]
    matchers = [_walked(backend, "json_schema", PERSON, tokenizer, k, seed=k) for k in range(6)]
    rows = [5, 0, 3, 1, 4, 2]  # any row order
    together = backend.allocate_bitmask(6)
    backend.fill_bitmasks(matchers, rows, together)
    alone = backend.allocate_bitmask(6)
    for matcher, row in zip(matchers, rows):
        matcher.fill_bitmask(alone, row)
    assert torch.equal(together, alone)


def test_one_step_mixes_rows_of_both_backends(backends, tokenizer):
    auto = backends["auto"]
    json_row = _walked(auto, "json_schema", TAGGED, tokenizer, 3, seed=1)
    regex_row = _walked(auto, "regex", "[0-9]{2,6}", tokenizer, 1, seed=2)
    assert isinstance(json_row, LLGuidanceMatcher) and isinstance(regex_row, XGrammarMatcher)
    together = auto.allocate_bitmask(2)
    auto.fill_bitmasks([regex_row, json_row], [1, 0], together)
    alone = auto.allocate_bitmask(2)
    json_row.fill_bitmask(alone, 0)
    regex_row.fill_bitmask(alone, 1)
    assert torch.equal(together, alone)


def test_llguidance_matcher_keeps_its_state_on_a_refused_token(backends, tokenizer):
    matcher = backends["llguidance"].get_matcher("regex", "ab").result(timeout=30)
    b = tokenizer.convert_tokens_to_ids("b")
    a = tokenizer.convert_tokens_to_ids("a")
    assert not matcher.accept_token(b)  # refused: the state is unchanged
    assert matcher.accept_token(a) and matcher.accept_token(b)
    assert not matcher.is_terminated()  # only a stop token ends it, as with xgrammar
    assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()
    assert not matcher.accept_token(a)  # nothing follows the end


def test_llguidance_rollback_and_forced_text(backends, tokenizer):
    matcher = backends["llguidance"].get_matcher("json_schema", PERSON).result(timeout=30)
    assert matcher.find_jump_forward_string() == "{"  # whitespace may follow it
    opening = tokenizer.encode('{"')
    assert all(matcher.accept_token(t) for t in opening)
    assert matcher.find_jump_forward_string() == 'name"'  # the only key that can come first
    matcher.rollback(len(opening))
    assert matcher.find_jump_forward_string() == "{"


@pytest.mark.parametrize("name", ["llguidance", "auto"])
def test_walks_under_the_llguidance_grammars_validate(backends, tokenizer, name):
    from loom.constrain.schema_check import validate_output

    backend = backends[name]
    for text, seed_base in ((PERSON, 0), (TAGGED, 100)):  # auto: xgrammar, then llguidance
        finished = 0
        for seed in range(8):
            matcher = backend.get_matcher("json_schema", text).result(timeout=30)
            out = random_walk(backend, matcher, tokenizer, seed=seed_base + seed, max_steps=200)
            if out is not None:
                finished += 1
                assert validate_output(json.loads(text), out) is None, out
        assert finished >= 3


@pytest.mark.parametrize("name", ["auto", "llguidance"])
def test_lenient_schemas_compile_without_the_unenforced_keyword(backends, tokenizer, name):
    odd = json.dumps({"type": "integer", "not": {"const": 3}})
    backends[name].validate("json_schema", odd, lenient=True)
    matcher = backends[name].get_matcher("json_schema", odd, lenient=True).result(timeout=30)
    three = tokenizer.encode("3")  # what `not` forbids: lenient leaves it to the validation
    assert all(matcher.accept_token(t) for t in three)


def test_a_compile_that_fails_on_the_chosen_backend_falls_to_the_next(tokenizer, monkeypatch):
    auto = create_grammar_backend(
        "auto", tokenizer, model_vocab_size(tokenizer), num_threads=1, mask_threads=1
    )
    try:
        xgrammar = auto.backends["xgrammar"]

        def too_big(kind, text):
            raise GrammarError("json_schema does not compile: grammar too large")

        monkeypatch.setattr(xgrammar, "_compile", too_big)
        assert auto.choose("json_schema", PERSON) is xgrammar  # its up-front check passes
        matcher = auto.get_matcher("json_schema", PERSON).result(timeout=30)
        assert isinstance(matcher, LLGuidanceMatcher)
        with pytest.raises(GrammarError, match="invalid regex"):  # nothing after xgrammar
            auto.get_matcher("regex", "(unclosed").result(timeout=30)
    finally:
        auto.shutdown()
