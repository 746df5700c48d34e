"""JSON-Schema-Test-Suite (draft 2020-12) against each of loom's grammar backends.

For every schema loom accepts, each valid instance must be accepted by a matcher (fed as
token ids, then eos) and each invalid one rejected; random walks through the grammar must
produce JSON that validates. A grammar accepting what the schema forbids is an honesty
bug: fix it in loom/constrain/schema_check.py, never here. A grammar refusing a valid
instance only because of a formatting or narrowing choice is excused below, case by case.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from loom.constrain.base import GrammarError
from loom.constrain.factory import create_grammar_backend
from loom.constrain.schema_check import check_schema, find_unsupported, validate_output
from tests.grammar_helpers import make_tokenizer, model_vocab_size, random_walk

SUITE = (
    Path(
        os.environ.get(
            "LOOM_JSON_SCHEMA_SUITE",
            Path(__file__).resolve().parent / "data/json-schema-test-suite",  # MIT, vendored
        )
    )
    / "tests/draft2020-12"
)
FILES = sorted(p.name for p in SUITE.glob("*.json"))  # optional/ is not globbed
WALKS_PER_SCHEMA = 3

# Why a valid instance may be refused; every excused case is listed below by name.
STRICT = "strict mode closes extra keys / items the schema leaves open"
INFERRED = "xgrammar infers the instance type from properties / items / required"
NUMBER = "integral numbers are written without a fraction (1, not 1.0)"
LITERAL = "const / enum objects and arrays only in compact spelling (no spaces)"
LITERAL_ORDER = "const objects only in the declared key order"
FORMAT = "format is enforced (the suite treats it as an annotation by default)"
FORMS = {"compact", "indent", "minified"}
EXCUSED_FORMS = {LITERAL: {"compact", "indent"}}  # the minified spelling must pass

NUMBER_CASES = [
    ("const.json", "const with -2.0 matches integer and float types", "float -2.0 is valid"),
    ("const.json", "const with 0 does not match other zero-like types", "float zero is valid"),
    ("const.json", "const with 1 does not match true", "float one is valid"),
    ("const.json", "float and integers are equal up to 64-bit representation limits",
     "float is valid"),
    ("enum.json", "enum with 0 does not match false", "float zero is valid"),
    ("enum.json", "enum with 1 does not match true", "float one is valid"),
    ("enum.json", "enum with [0] does not match [false]", "[0.0] is valid"),
    ("enum.json", "enum with [1] does not match [true]", "[1.0] is valid"),
    ("type.json", "integer type matches integers",
     "a float with zero fractional part is an integer"),
]  # fmt: skip
EXCUSED: dict[str, list[tuple[str, str, str]]] = {
    STRICT: [
        ("additionalProperties.json", "additionalProperties are allowed by default",
         "additional properties are allowed"),
        ("anyOf.json", "anyOf complex types", "both anyOf valid (complex)"),
        ("prefixItems.json", "a schema given for prefixItems", "array with additional items"),
        ("prefixItems.json", "additional items are allowed by default",
         "only the first item is validated"),
        ("properties.json", "object properties validation",
         "doesn't invalidate other properties"),
        *[("uniqueItems.json", "uniqueItems=false with an array of items",
           f"{kind} array extended from {start} is valid")
          for kind in ("unique", "non-unique") for start in ("[false, true]", "[true, false]")],
    ],
    INFERRED: [
        ("items.json", "a schema given for items", "ignores non-arrays"),
        ("items.json", "a schema given for items", "JavaScript pseudo-array is valid"),
        ("prefixItems.json", "a schema given for prefixItems",
         "JavaScript pseudo-array is valid"),
        ("properties.json", "object properties validation", "ignores arrays"),
        ("properties.json", "object properties validation", "ignores other non-objects"),
        ("properties.json", "properties whose names are Javascript object property names",
         "ignores arrays"),
        ("properties.json", "properties whose names are Javascript object property names",
         "ignores other non-objects"),
        ("ref.json", "root pointer ref", "match"),
        ("ref.json", "root pointer ref", "recursive match"),
        *[("required.json", "required validation", f"ignores {what}")
          for what in ("arrays", "strings", "other non-objects", "null", "boolean")],
    ],
    NUMBER: NUMBER_CASES,
    LITERAL: [
        ("const.json", "const with array", "same array is valid"),
        ("const.json", "const with object", "same object is valid"),
        ("const.json", "const with [false] does not match [0]", "[false] is valid"),
        ("const.json", "const with [true] does not match [1]", "[true] is valid"),
        ("const.json", 'const with {"a": false} does not match {"a": 0}',
         '{"a": false} is valid'),
        ("const.json", 'const with {"a": true} does not match {"a": 1}', '{"a": true} is valid'),
        ("enum.json", "enum with [0] does not match [false]", "[0] is valid"),
        ("enum.json", "enum with [1] does not match [true]", "[1] is valid"),
        ("enum.json", "enum with [false] does not match [0]", "[false] is valid"),
        ("enum.json", "enum with [true] does not match [1]", "[true] is valid"),
        ("enum.json", "heterogeneous enum validation", "valid object matches"),
        ("ref.json", "naive replacement of $ref with its destination is not correct",
         "match the enum exactly"),
    ],
    LITERAL_ORDER: [
        ("const.json", "const with object", "same object with different property order is valid"),
    ],
    FORMAT: [
        ("format.json", "date format", "invalid date string is only an annotation by default"),
    ],
}  # fmt: skip
# Schemas whose lenient verdicts (jsonschema's) differ from the suite's, and why.
LENIENT_EXCUSED = {
    ("vocabulary.json", "schema that uses custom metaschema with with no validation vocabulary"):
    "a remote metaschema is never fetched, so jsonschema applies the full 2020-12 vocabulary",
}  # fmt: skip
ORDER = "keys come in one order (llguidance orders merged and required-only keys itself)"
LLGUIDANCE_EXCUSED: dict[str, list[tuple[str, str, str]]] = {
    STRICT: EXCUSED[STRICT],  # the default; strictness.close_schema
    NUMBER: NUMBER_CASES,
    FORMAT: [
        ("format.json", f"{fmt} format", f"invalid {fmt} string is only an annotation by default")
        for fmt in ("date", "date-time", "duration", "email", "hostname", "ipv4", "ipv6",
                    "time", "uri", "uuid")
    ],
    ORDER: [
        ("allOf.json", "allOf", "allOf"),
        ("allOf.json", "allOf with base schema", "valid"),
        ("const.json", "const with object", "same object with different property order is valid"),
        ("dependentRequired.json", "dependencies with escaped characters", "quoted quotes"),
        ("dependentRequired.json", "multiple dependents required", "with dependencies"),
        ("dependentRequired.json", "single dependency", "with dependency"),
        ("oneOf.json", "oneOf with required", "first valid - valid"),
        ("oneOf.json", "oneOf with required", "second valid - valid"),
    ],
}  # fmt: skip
_EXCUSE_OF = {
    "xgrammar": {case: reason for reason, cases in EXCUSED.items() for case in cases},
    "llguidance": {case: reason for reason, cases in LLGUIDANCE_EXCUSED.items() for case in cases},
}

pytestmark = pytest.mark.skipif(not FILES, reason=f"JSON-Schema-Test-Suite not found at {SUITE}")


@dataclass
class FileReport:
    accepted: int = 0  # schemas loom compiles (non-lenient)
    rejected_keyword: int = 0  # refused up front: a keyword xgrammar cannot enforce
    rejected_compile: int = 0  # refused: xgrammar cannot build it, or `re` cannot parse it
    instances: int = 0  # (instance, spelling) pairs fed to a matcher
    excused: int = 0  # valid instances refused for a reason listed in EXCUSED
    walks: int = 0  # random walks that terminated and were validated
    lenient_checked: int = 0  # instances validate_output judged for rejected schemas
    failures: list[str] = field(default_factory=list)


BACKENDS = ("xgrammar", "llguidance", "auto")


@functools.cache
def _backend(name: str):
    tokenizer = make_tokenizer()
    return create_grammar_backend(name, tokenizer, model_vocab_size(tokenizer), num_threads=2)


def _spellings(data: object) -> dict[str, str]:
    return {
        "compact": json.dumps(data, ensure_ascii=False),
        "indent": json.dumps(data, ensure_ascii=False, indent=2),
        "minified": json.dumps(data, ensure_ascii=False, separators=(",", ":")),
    }


def _accepts(backend, schema_text: str, text: str) -> bool:
    tokenizer = make_tokenizer()
    matcher = backend.get_matcher("json_schema", schema_text).result(timeout=30)
    if not all(matcher.accept_token(t) for t in tokenizer.encode(text)):
        return False
    return matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*map(_keys, node.values()))
    if isinstance(node, list):
        return set().union(*map(_keys, node))
    return set()


@functools.cache
def run_file(backend_name: str, name: str) -> FileReport:
    report, backend = FileReport(), _backend(backend_name)
    for case_index, case in enumerate(json.loads((SUITE / name).read_text())):
        text = json.dumps(case["schema"])
        try:
            backend.validate("json_schema", text)
        except GrammarError as e:
            _check_rejection(report, name, case, str(e))
            continue
        report.accepted += 1
        for test in case["tests"]:
            _check_instance(report, backend, name, case, test, text)
        _check_walks(report, backend, name, case, text, seed=case_index)
    return report


def _check_rejection(report: FileReport, name: str, case: dict, message: str) -> None:
    where = f"{name} :: {case['description']}"
    if "which loom cannot enforce" in message:
        report.rejected_keyword += 1
        keyword = message.split("'")[1]
        if keyword not in _keys(case["schema"]):
            report.failures.append(f"{where}: message names {keyword!r}, not in the schema")
    elif "does not compile" in message or "not a valid JSON Schema" in message:
        report.rejected_compile += 1  # xgrammar's converter, or Python's regex dialect
        return
    else:
        report.failures.append(f"{where}: unexpected rejection {message!r}")
        return
    if (name, case["description"]) in LENIENT_EXCUSED:
        return
    for test in case["tests"]:  # lenient mode validates afterwards: it must judge right
        verdict = validate_output(case["schema"], json.dumps(test["data"]))
        if verdict is not None and "cannot be validated" in verdict:
            continue  # a remote $ref: never fetched
        report.lenient_checked += 1
        if (verdict is None) != test["valid"]:
            report.failures.append(f"{where} :: {test['description']}: lenient said {verdict}")


def _check_instance(report, backend, name, case, test, schema_text) -> None:
    chosen = backend.choose("json_schema", schema_text) if backend.name == "auto" else backend
    reason = _EXCUSE_OF[chosen.name].get((name, case["description"], test["description"]))
    for form, text in _spellings(test["data"]).items():
        report.instances += 1
        accepted = _accepts(backend, schema_text, text)
        if accepted == test["valid"]:
            continue
        where = f"{name} :: {case['description']} :: {test['description']} ({form}) {text!r}"
        if accepted:
            report.failures.append(f"HONESTY: grammar accepts an invalid instance: {where}")
        elif reason is not None and form in EXCUSED_FORMS.get(reason, FORMS):
            report.excused += 1
        else:
            report.failures.append(f"grammar refuses a valid instance: {where}")


def _check_walks(report, backend, name, case, schema_text, seed) -> None:
    tokenizer = make_tokenizer()
    for walk in range(WALKS_PER_SCHEMA):
        matcher = backend.get_matcher("json_schema", schema_text).result(timeout=30)
        text = random_walk(backend, matcher, tokenizer, seed=seed * 100 + walk)
        if text is None:
            continue
        report.walks += 1
        verdict = validate_output(case["schema"], text)
        if verdict is not None:
            report.failures.append(
                f"HONESTY: walk wrote {text!r} under {name} :: {case['description']}: {verdict}"
            )


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_suite_file(backend, name):
    failures = run_file(backend, name).failures
    assert not failures, "\n".join(failures)


def test_excused_cases_exist_in_the_suite():
    known = {
        (name, case["description"], test["description"])
        for name in FILES
        for case in json.loads((SUITE / name).read_text())
        for test in case["tests"]
    }
    for excused in _EXCUSE_OF.values():
        assert set(excused) <= known, sorted(set(excused) - known)


@pytest.mark.parametrize("backend", BACKENDS)
def test_suite_summary(backend, record_property):
    reports = {name: run_file(backend, name) for name in FILES}
    totals = FileReport()
    for report in reports.values():
        for key in ("accepted", "rejected_keyword", "rejected_compile", "instances",
                    "excused", "walks", "lenient_checked"):  # fmt: skip
            setattr(totals, key, getattr(totals, key) + getattr(report, key))
    summary = (
        f"JSON-Schema-Test-Suite draft2020-12 ({len(FILES)} files): "
        f"{totals.accepted} schemas accepted, {totals.rejected_keyword} rejected for an "
        f"unenforceable keyword, {totals.rejected_compile} that do not compile; "
        f"{totals.instances} instance spellings checked, {totals.excused} valid ones "
        f"excused ({backend}); {totals.walks} random walks validated; "
        f"{totals.lenient_checked} lenient verdicts checked"
    )
    print(summary)
    for key in ("accepted", "rejected_keyword", "rejected_compile", "instances", "walks"):
        record_property(key, getattr(totals, key))
    assert totals.accepted > 100 and totals.walks > 200
    assert not any(r.failures for r in reports.values())


# -- schema_check: what is flagged, and what is not ------------------------------------


@pytest.mark.parametrize(
    "schema, expected",
    [
        # keywords as property names are names, not keywords
        ({"type": "object", "properties": {"not": {"type": "string"}, "if": {}},
          "required": ["not"]}, []),
        ({"type": "object", "properties": {"a/b": {"type": "integer", "multipleOf": 2}}},
         [("multipleOf", "/properties/a~1b")]),
        ({"$defs": {"unused": {"not": {}}}, "type": "integer"}, []),
        ({"$defs": {"odd": {"type": "integer", "not": {"multipleOf": 2}}},
          "$ref": "#/$defs/odd"}, [("not", "/$defs/odd"), ("multipleOf", "/$defs/odd/not")]),
        ({"minimum": 3}, [("minimum", "")]),
        ({"type": "number", "minimum": 3}, []),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False}, []),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
         [("uniqueItems", "")]),
        ({"type": "string", "enum": ["a", "b"]}, []),
        ({"type": "string", "enum": ["a", 1]}, []),  # folded to the values that pass: ["a"]
        ({"type": "string", "maxLength": 3, "pattern": "^a+$"}, [("maxLength", "")]),
        ({"type": "string", "pattern": "^a\\Z"}, [("pattern", "")]),
        ({"type": "object", "properties": {"a": {}}, "additionalProperties": True},
         [("additionalProperties", "")]),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, []),
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]},
         [("required", "")]),
        ({"$ref": "http://example.com/s.json"}, [("$ref", "")]),
        ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "maximum": 3},
         [("$ref", ""), ("maximum", "")]),
        ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "description": "d"}, []),
        ({"allOf": [{"type": "integer"}]}, []),
        ({"allOf": [{"type": "integer"}, {"type": "number"}]}, [("allOf", "")]),
        ({"type": "integer", "anyOf": [{"type": "integer"}, {"type": "null"}]},
         [("anyOf", "")]),
        ({"type": ["integer", "null"], "anyOf": [{"type": "integer"}, {"type": "null"}]}, []),
        ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, []),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, [("oneOf", "")]),
        # xgrammar 0.2.9 compiles (xy+)? as x?y*; {4} inside is fine
        ({"type": "string", "pattern": "^a(xy+)?$"}, [("pattern", "")]),
        ({"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"}, []),
        ({"type": "string", "format": "ipv4"}, [("format", "")]),
        ({"type": "string", "format": "date"}, []),  # an exact pattern (formats.py)
        ({"type": "string", "format": "date-time"}, [("format", "")]),  # its has (\.[0-9]+)?
        ({"type": "string", "format": "int32"}, []),  # not a spec format: an annotation
    ],
)  # fmt: skip
def test_find_unsupported(schema, expected):
    assert sorted(find_unsupported(schema)) == sorted(expected)


def _pydantic_person_schema() -> dict:
    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool = True

    class Address(BaseModel):
        street: str = Field(min_length=1, max_length=40, description="street")
        zip: str = Field(pattern=r"^\d{5}$")

    class Person(BaseModel):
        name: str
        age: int = Field(ge=0, lt=150)
        score: float = Field(gt=0, le=1.5)
        email: str | None = None
        tags: list[Literal["a", 'b"c', "d\\e"]] = Field(default_factory=list, max_length=3)
        address: Address | None = None
        pet: Cat | Dog = Field(discriminator="kind")

    return Person.model_json_schema()


REALISTIC = {
    "pydantic person": _pydantic_person_schema(),
    "recursive tree": {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["v"]}},
        "$ref": "#/$defs/node"},
    "tuple with formats": {
        "type": "array", "minItems": 2, "prefixItems": [
            {"type": "string", "pattern": "^[A-Z][a-z]+$"},
            {"type": "string", "format": "date"}, {"type": "string", "format": "uuid"}]},
    "number bounds": {
        "type": "object", "required": ["x", "y", "z"], "properties": {
            "x": {"anyOf": [{"type": "number", "minimum": -1.5, "maximum": 2.25},
                            {"type": "null"}]},
            "y": {"type": "number", "exclusiveMaximum": 0.001},
            "z": {"type": "integer", "minimum": -10, "exclusiveMaximum": 10}}},
    "short strings": {
        "type": "object", "required": ["s", "q"], "properties": {
            "s": {"type": "string", "maxLength": 3}, "q": {"type": "string", "minLength": 2},
            "e": {"enum": [1, "1", True, None, [1], {"a": 1}]}}},
    "free object": {"type": "object", "additionalProperties": {"type": "integer"},
                    "maxProperties": 3},
}  # fmt: skip


@pytest.mark.parametrize("name", REALISTIC)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_realistic_schema_is_accepted_and_walks_validate(backend_name, name):
    schema, backend = REALISTIC[name], _backend(backend_name)
    text = json.dumps(schema)
    backend.validate("json_schema", text)
    finished = 0
    for seed in range(25):
        matcher = backend.get_matcher("json_schema", text).result(timeout=30)
        output = random_walk(backend, matcher, make_tokenizer(), seed=seed, max_steps=300)
        if output is not None:
            finished += 1
            assert validate_output(schema, output) is None, output
    assert finished >= 10


def test_check_schema_lenient_returns_the_schema():
    assert check_schema('{"type": "integer", "not": {"const": 3}}', lenient=True) == {
        "type": "integer",
        "not": {"const": 3},
    }


def test_validate_output_names_the_violation():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    assert validate_output(schema, '{"n": 6}') is None
    assert "at /n" in validate_output(schema, '{"n": 7}') and "multiple of 3" in (
        validate_output(schema, '{"n": 7}')
    )
    assert "not valid JSON" in validate_output(schema, '{"n": ')
