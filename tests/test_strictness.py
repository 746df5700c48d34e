"""Strict (the default) and non-strict JSON schemas (loom/constrain/strictness.py): every
backend enforces the same meaning, whatever its own default."""

from __future__ import annotations

import json

import pytest

from loom.constrain.factory import create_grammar_backend
from loom.constrain.strictness import close_schema, open_schema, open_schema_text
from loom.runtime.sampling.params import SamplingParams
from tests.grammar_helpers import make_tokenizer, model_vocab_size

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    "required": ["name"],
}


def test_open_schema_writes_json_schemas_defaults_out():
    opened = open_schema(PERSON)
    assert opened["additionalProperties"] is True
    assert opened["properties"]["address"]["additionalProperties"] is True
    assert "additionalProperties" not in PERSON  # a copy
    tuple_ = open_schema({"type": "array", "prefixItems": [{"type": "integer"}]})
    assert tuple_["items"] is True
    closed_already = {"type": "object", "properties": {}, "additionalProperties": False}
    assert open_schema(closed_already) == closed_already


def test_close_schema_closes_only_objects_whose_keys_are_all_declared_beside_them():
    closed = close_schema(PERSON)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["address"]["additionalProperties"] is False
    merged = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert close_schema(merged) == merged  # each member's siblings add keys
    composed = {"properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]}
    assert close_schema(composed) == composed  # the union's keys join the object's own
    union = {"anyOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert [b["additionalProperties"] for b in close_schema(union)["anyOf"]] == [False, False]
    defs = {"$ref": "#/$defs/p", "$defs": {"p": {"properties": {"a": {}}}}}
    assert close_schema(defs)["$defs"]["p"]["additionalProperties"] is False
    open_ = {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert close_schema(open_) == open_


def test_sampling_params_send_the_opened_schema_when_not_strict():
    text = json.dumps(PERSON)
    assert SamplingParams(json_schema=text).constraint == ("json_schema", text)
    loose = SamplingParams(json_schema=text, json_schema_strict=False).constraint
    assert loose == ("json_schema", open_schema_text(text))
    assert json.loads(loose[1])["additionalProperties"] is True


TOKENIZER = make_tokenizer()


def accepts(matcher, text: str) -> bool:
    return all(matcher.accept_token(t) for t in TOKENIZER.encode(text))


@pytest.fixture(scope="module")
def auto():
    tokenizer = TOKENIZER
    backend = create_grammar_backend("auto", tokenizer, model_vocab_size(tokenizer), num_threads=2)
    yield backend
    backend.shutdown()


@pytest.mark.parametrize("name", ["xgrammar", "llguidance"])
def test_strict_refuses_an_undeclared_key_on_every_backend(auto, name):
    matcher = auto.backends[name].get_matcher("json_schema", json.dumps(PERSON)).result(10)
    assert accepts(matcher, '{"name": "Al"')
    assert not accepts(matcher, ', "age"')


def test_non_strict_accepts_undeclared_keys_but_not_a_declared_one_in_disguise(auto):
    text = open_schema_text(json.dumps(PERSON))
    assert auto.choose("json_schema", text).name == "llguidance"  # xgrammar refuses it
    matcher = auto.get_matcher("json_schema", text).result(10)
    # undeclared keys follow the declared ones (declared order is kept: issue 16 leaves
    # any-order objects open)
    assert accepts(matcher, '{"name": "Al", "address": {"city": "X", "zip": 1}, "age": 3}')
    disguised = auto.get_matcher("json_schema", text).result(10)
    assert accepts(disguised, '{"name": "Al", ')
    assert not accepts(disguised, '"\\u006eame"')  # "name" spelled with an escape


@pytest.mark.parametrize("strict, expected", [(True, True), (None, True), (False, False)])
def test_openai_strict_false_asks_for_json_schemas_own_meaning(strict, expected):
    from loom.runtime.http.openai_protocol import ChatCompletionRequest, sampling_params

    fmt = {"name": "p", "schema": PERSON} | ({} if strict is None else {"strict": strict})
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": fmt},
    )
    params = SamplingParams.from_dict(sampling_params(req, 8))
    assert params.json_schema_strict is expected
    assert params.json_schema_lenient is (strict is False)


def test_close_schema_keeps_conditions_combinations_and_what_they_reference_open():
    cond = {
        "properties": {"kind": {"type": "string"}},
        "if": {"properties": {"kind": {"const": "a"}}},
        "then": {"properties": {"a": {"type": "integer"}}},
    }
    assert close_schema(cond) == cond  # closing `if` would change which instances match
    negated = {"not": {"properties": {"a": {}}}}
    assert close_schema(negated) == negated
    # closing oneOf's branches would widen it: {"a", "b"} would match only the first
    exclusive = {"oneOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}, "required": ["b"]}]}
    assert close_schema(exclusive) == exclusive
    inherited = {
        "$defs": {"base": {"properties": {"id": {}}}, "leaf": {"properties": {"x": {}}}},
        "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"more": {}}}],
        "properties": {"child": {"$ref": "#/$defs/leaf"}},
    }
    closed = close_schema(inherited)
    assert "additionalProperties" not in closed["$defs"]["base"]  # used by an allOf
    assert closed["$defs"]["leaf"]["additionalProperties"] is False  # a property's value
    undeclared = {"properties": {"a": {}}, "required": ["a", "b"]}
    assert close_schema(undeclared) == undeclared  # closing it would make it unsatisfiable
