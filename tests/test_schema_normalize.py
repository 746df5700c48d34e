"""Schema rewrites keep meaning: jsonschema (formats asserted) gives every instance the
same verdict before and after normalize(); the exact format patterns accept exactly what
jsonschema's format checkers accept."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

from loom.constrain.factory import create_grammar_backend
from loom.constrain.formats import EMAIL, PATTERNS
from loom.constrain.schema_normalize import for_grammar, normalize
from tests.grammar_helpers import make_tokenizer, model_vocab_size
from tests.test_json_schema_suite import FILES, SUITE

CHECKER = Draft202012Validator.FORMAT_CHECKER


def verdict(schema, instance) -> bool:
    cls = validator_for(schema, default=Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


def test_date_pattern_is_the_calendar():
    day, end = date(1, 1, 1), date(1, 3, 5)
    years = [1, 4, 100, 400, 1900, 2000, 2023, 2024, 2100, 9996, 9999]
    for year in years:
        for month in range(0, 14):
            for d in range(0, 33):
                text = f"{year:04d}-{month:02d}-{d:02d}"
                assert bool(re.fullmatch(PATTERNS["date"], text)) == CHECKER.conforms(
                    text, "date"
                ), text
    while day < end:  # every day of a year's start, in order
        assert re.fullmatch(PATTERNS["date"], day.isoformat())
        day += timedelta(days=1)
    assert not re.fullmatch(PATTERNS["date"], "0000-01-01")  # Python's dates start at 1


@settings(max_examples=400, deadline=None)
@given(
    h=st.integers(0, 25),
    m=st.integers(0, 61),
    s=st.integers(0, 61),
    frac=st.sampled_from(["", ".5", ".123456", "."]),
    offset=st.sampled_from(["Z", "z", "+01:00", "-23:59", "+24:00", "+01:60", "", "+0100"]),
    sep=st.sampled_from(["T", "t", " "]),
)
def test_time_and_date_time_patterns_are_rfc3339(h, m, s, frac, offset, sep):
    time = f"{h:02d}:{m:02d}:{s:02d}{frac}{offset}"
    assert bool(re.fullmatch(PATTERNS["time"], time)) == CHECKER.conforms(time, "time")
    stamp = f"2024-02-29{sep}{time}"
    assert bool(re.fullmatch(PATTERNS["date-time"], stamp)) == CHECKER.conforms(stamp, "date-time")


@pytest.mark.skipif(not FILES, reason=f"JSON-Schema-Test-Suite not found at {SUITE}")
@pytest.mark.parametrize("expand", [True, False])
def test_every_suite_instance_keeps_its_verdict(expand):
    checked = 0
    for name in FILES:
        for case in json.loads((SUITE / name).read_text()):
            before, after = case["schema"], normalize(case["schema"], expand=expand)
            for test in case["tests"]:
                try:
                    expected = verdict(before, test["data"])
                except Exception:  # noqa: BLE001 - a remote $ref: nothing to compare
                    continue
                assert verdict(after, test["data"]) == expected, (name, case["description"])
                checked += 1
    assert checked > 1000


DEPENDENT = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {}, "c": {"type": "string"}},
    "dependentRequired": {"a": ["b"]},
    "dependentSchemas": {"c": {"required": ["a"]}},
    "dependencies": {"b": ["c"]},  # not a 2020-12 keyword: ignored, as the validator does
}
DRAFT7_DEPENDENT = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {}},
    "dependencies": {"a": ["b"], "b": {"properties": {"c": {"type": "string"}}}},
}
ONE_OF_KEYS = {"oneOf": [{"required": ["x"]}, {"required": ["y", "z"]}, {"required": ["y"]}]}
FOLDED = {"enum": [1, 2, "a", None, {"k": 1}], "not": {"type": "string"}, "minimum": 2}
CUSTOM_FORMAT = {"type": "string", "format": "int32", "maxLength": 3}
KEY_OR_UUID = {"oneOf": [{"format": "uuid"}, {"pattern": "^\\$[A-Z0-9_-]+"}]}  # Snowplow
SWITCH = {  # JSONSchemaBench's JME_37, with the property names of the strategy below
    "type": "object",
    "properties": {"a": {"type": "boolean"}, "b": {"type": "string"}},
    "required": ["a"],
    "if": {"properties": {"a": {"const": True}}},
    "then": {"properties": {"b": {"maxLength": 1}}},
    "else": {"properties": {"b": {"minLength": 1}}, "required": ["b"]},
}
SWITCH_REQUIRED = {
    "type": "object",
    "properties": {"k": {"enum": ["x", "y", 1]}},
    "if": {"properties": {"k": {"enum": ["x", 1]}}, "required": ["k"]},
    "then": {"required": ["a"]},
    "else": {"maxProperties": 1},
}

small_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from(["a", "b", "x", "y", "", "$AB", "$", "123e4567-e89b-12d3-a456-426614174000"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "c", "x", "y", "z", "k"]), inner, max_size=4)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize(
    "schema",
    [
        DEPENDENT,
        DRAFT7_DEPENDENT,
        ONE_OF_KEYS,
        FOLDED,
        CUSTOM_FORMAT,
        SWITCH,
        SWITCH_REQUIRED,
        KEY_OR_UUID,
    ],
)
@settings(max_examples=300, deadline=None)
@given(instance=small_json)
def test_rewritten_schemas_judge_random_instances_alike(schema, instance):
    assert verdict(normalize(schema), instance) == verdict(schema, instance)


def test_what_the_rewrites_produce():
    assert normalize(CUSTOM_FORMAT) == {"type": "string", "maxLength": 3}
    assert normalize(FOLDED) == {"enum": [2, None, {"k": 1}]}
    assert normalize({"type": "string", "format": "date"})["pattern"] == f"^{PATTERNS['date']}$"
    expanded = normalize(ONE_OF_KEYS)
    assert "oneOf" not in expanded and len(expanded["anyOf"]) == 2  # {y} is inside {y, z}
    assert "oneOf" in normalize(ONE_OF_KEYS, expand=False)  # xgrammar gets it unchanged
    for schema in (DEPENDENT, DRAFT7_DEPENDENT):
        assert not {"dependentRequired", "dependentSchemas", "dependencies"} & set(
            normalize(schema)
        )
    assert "if" not in normalize(SWITCH) and "anyOf" in normalize(SWITCH)
    assert "if" in normalize(SWITCH, expand=False)
    assert normalize(KEY_OR_UUID)["anyOf"][0] == {"type": "string", "format": "uuid"}
    overlapping = {"oneOf": [{"format": "uuid"}, {"pattern": "^[0-9]"}]}
    assert "oneOf" in normalize(overlapping)
    disjoint = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    assert normalize(disjoint) == {"anyOf": disjoint["oneOf"]}


EMAILS = ["john.doe@example.com", "a@b.c", "x+tag@mail-1.example.org", "o'neil@x--y.io"]
NOT_EMAILS = [
    '"joe bloggs"@x.org',
    "john@",
    "@example.com",
    "a..b@x.org",
    ".a@x.org",
    "a@-x.org",
    "a@x-.org",
    "a b@x",
]


def test_email_as_a_grammar_writes_it_passes_jsonschemas_check():
    for text in EMAILS:
        assert re.fullmatch(EMAIL, text) and CHECKER.conforms(text, "email"), text
    for text in NOT_EMAILS:
        assert not re.fullmatch(EMAIL, text), text
    typed = {"type": "string", "format": "email"}
    assert for_grammar(typed) == {"type": "string", "pattern": f"^{EMAIL}$"}
    assert normalize(typed) == typed  # normalize keeps meaning: the narrowing is separate
    assert for_grammar({"format": "email"}) == {"format": "email"}  # not only strings


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab.@-_+" \\', max_size=12))
def test_every_grammar_email_has_an_at_sign(text):
    if re.fullmatch(EMAIL, text):
        assert CHECKER.conforms(text, "email")


@pytest.mark.parametrize("backend_name", ["xgrammar", "llguidance"])
def test_both_backends_write_the_same_emails(backend_name):
    tokenizer = make_tokenizer()
    backend = create_grammar_backend(backend_name, tokenizer, model_vocab_size(tokenizer))
    schema = json.dumps({"type": "string", "format": "email"})
    try:
        for text, valid in [(t, True) for t in EMAILS] + [(t, False) for t in NOT_EMAILS]:
            matcher = backend.get_matcher("json_schema", schema).result(timeout=30)
            ids = tokenizer.encode(json.dumps(text)) + [tokenizer.eos_token_id]
            taken = all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()
            assert taken == valid, text
    finally:
        backend.shutdown()
