"""Constrained decoding end to end through loom.Engine on the real default model
(SmolLM2-135M): JSON schemas validate with `jsonschema`, regex outputs fullmatch, EBNF
outputs parse with an independent parser, choices are among the choices; bad grammars are
refused before scheduling and the engine keeps serving. A compile that outlives its limit
aborts only its request: that one runs on an in-process scheduler whose compiler the test
holds back, so the limit is certainly exceeded on any machine.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import threading
import time

import jsonschema
import pytest

from loom.runtime.args import ServerArgs
from loom.runtime.engine import Engine
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import InvalidRequestError, SamplingParams
from loom.runtime.scheduler.scheduler import Scheduler

_STR = {"type": "string"}
_POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "number", "minimum": -100, "maximum": 100},
        "y": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "required": ["x", "y"],
}
SCHEMAS = [
    (
        "Describe a fictional person: name, age and email.",
        {
            "type": "object",
            "properties": {
                "name": _STR,
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "format": "email"},
            },
            "required": ["name", "age", "email"],
        },
    ),
    (
        "Give a famous novel, its author and the year it was published.",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "author": {
                    "type": "object",
                    "properties": {
                        "name": _STR,
                        "born": {"type": "integer", "minimum": 1000, "maximum": 2010},
                    },
                    "required": ["name", "born"],
                },
                "year": {"type": "integer", "minimum": 1450, "maximum": 2025},
            },
            "required": ["title", "author", "year"],
        },
    ),
    (
        "List three fruits.",
        {
            "type": "object",
            "properties": {
                "fruits": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 3}
            },
            "required": ["fruits"],
        },
    ),
    (
        "What color is the sky?",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue", "yellow"]}},
            "required": ["color"],
        },
    ),
    (
        "Describe a line segment by its two end points.",
        {
            "$defs": {"point": _POINT},
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
        },
    ),
    (
        "Describe an event with a name, a date and, if you know it, a location.",
        {
            "type": "object",
            "properties": {
                "event": _STR,
                "date": {"type": "string", "format": "date"},
                "location": _STR,
            },
            "required": ["event", "date"],
        },
    ),
    (
        "Rate a movie from 1 to 5 and say whether you recommend it.",
        {
            "type": "object",
            "properties": {
                "movie": _STR,
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "recommend": {"type": "boolean"},
            },
            "required": ["movie", "rating", "recommend"],
        },
    ),
    (
        "Give today's temperature in Paris in Celsius.",
        {
            "type": "object",
            "properties": {
                "city": _STR,
                "celsius": {"type": "number", "minimum": -50, "maximum": 50},
            },
            "required": ["city", "celsius"],
        },
    ),
]
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
REGEXES = [
    ("What is the IP address of a home router?", rf"({_OCTET}\.){{3}}{_OCTET}"),
    ("When did World War II end? Give the date.", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
    ("Give a US phone number.", r"\(\d{3}\) \d{3}-\d{4}"),
]
_NUM = "[1-9][0-9]{0,2}"
# (prompt, EBNF, an independent regex for the same language)
EBNFS = [
    (
        "Write a short arithmetic expression.",
        f'root ::= term (("+" | "-") term)*\nterm ::= num (("*" | "/") num)*\nnum ::= {_NUM}',
        rf"{_NUM}([*/]{_NUM})*([+-]{_NUM}([*/]{_NUM})*)*",
    ),
    (
        "Introduce yourself.",
        'root ::= "Name: " [A-Z] [a-z]{1,12} "\\nJob: " ("engineer" | "teacher" | "doctor") "\\n"',
        r"Name: [A-Z][a-z]{1,12}\nJob: (engineer|teacher|doctor)\n",
    ),
]
# (prompt, constraint, the choices)
CHOICES = [
    ("Is water wet? Answer yes or no.", {"regex": "(yes|no)"}, ["yes", "no"]),
    (
        "Pick a fruit.",
        {"ebnf": 'root ::= "apple" | "banana" | "cherry"'},
        ["apple", "banana", "cherry"],
    ),
    (
        "Which planet is largest?",
        {"regex": "(Mercury|Venus|Earth|Mars|Jupiter|Saturn)"},
        ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"],
    ),
]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with Engine(max_total_tokens=16384) as e:
        yield e


def chat(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )


@pytest.fixture(scope="module")
def outputs(engine):
    """Every constrained case of this module in one greedy batch: text per case."""
    cases = [(p, {"json_schema": json.dumps(s), "max_new_tokens": 160}) for p, s in SCHEMAS]
    cases += [(p, {"regex": r, "max_new_tokens": 40}) for p, r in REGEXES]
    cases += [(p, {"ebnf": g, "max_new_tokens": 40}) for p, g, _ in EBNFS]
    cases += [(p, {**c, "max_new_tokens": 16}) for p, c, _ in CHOICES]
    outs = engine.generate(
        input_ids=[chat(engine, p) for p, _ in cases],
        sampling_params=[{"temperature": 0, **params} for _, params in cases],
    )
    for o in outs:  # every case ends because its grammar completed
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
    texts = [o["text"] for o in outs]
    n, r, e = len(SCHEMAS), len(REGEXES), len(EBNFS)
    return {
        "json": texts[:n],
        "regex": texts[n : n + r],
        "ebnf": texts[n + r : n + r + e],
        "choice": texts[n + r + e :],
    }


def test_json_schema_outputs_validate(outputs):
    checker = jsonschema.FormatChecker()
    for (_, schema), text in zip(SCHEMAS, outputs["json"]):
        jsonschema.validate(json.loads(text), schema, format_checker=checker)


def test_regex_outputs_fullmatch(outputs):
    for (_, regex), text in zip(REGEXES, outputs["regex"]):
        assert re.fullmatch(regex, text), (regex, text)


def test_ebnf_outputs_parse(outputs):
    for (_, _, reference), text in zip(EBNFS, outputs["ebnf"]):
        assert re.fullmatch(reference, text), text
    ast.parse(outputs["ebnf"][0], mode="eval")  # the arithmetic one is a Python expression


def test_choice_outputs_are_one_of_the_choices(outputs):
    for (_, _, choices), text in zip(CHOICES, outputs["choice"]):
        assert text in choices


def test_unconstrained_requests_in_a_mixed_batch_get_their_tokens_alone(engine):
    plain = [chat(engine, "Tell me a joke."), chat(engine, "What is the capital of Italy?")]
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    alone = [engine.generate(input_ids=p, sampling_params=params)["output_ids"] for p in plain]
    constrained = [(chat(engine, p), s) for p, s in SCHEMAS[:2]]
    mixed = engine.generate(
        input_ids=[constrained[0][0], plain[0], constrained[1][0], plain[1]],
        sampling_params=[
            {"temperature": 0, "max_new_tokens": 20, "json_schema": json.dumps(constrained[0][1])},
            params,
            {"temperature": 0, "max_new_tokens": 20, "json_schema": json.dumps(constrained[1][1])},
            params,
        ],
    )
    assert [mixed[1]["output_ids"], mixed[3]["output_ids"]] == alone


def test_length_finish_says_the_constrained_output_is_cut_off(engine):
    out = engine.generate(
        input_ids=chat(engine, SCHEMAS[0][0]),
        sampling_params={
            "temperature": 0,
            "max_new_tokens": 5,
            "json_schema": json.dumps(SCHEMAS[0][1]),
        },
    )
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "length"
    assert "cut off" in reason["message"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(out["text"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"json_schema": "{not json"}, "json"),
        (
            {
                "json_schema": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "not": {"const": 3}}},
                    "required": ["n"],
                }
            },
            "'not'",
        ),
        ({"ebnf": 'root ::= "a" |'}, "invalid ebnf"),
        ({"regex": "a+", "json_schema": '{"type": "string"}'}, "one constraint"),
        ({"ebnf": 'root ::= undefined_rule "a"'}, "invalid ebnf"),
    ],
)
def test_bad_grammar_is_refused_before_scheduling(engine, params, message):
    before = engine.get_server_info()
    with pytest.raises(InvalidRequestError, match=re.compile(message, re.IGNORECASE)):
        engine.generate("Hello", {"max_new_tokens": 4, **params})
    assert engine.get_server_info().prompt_tokens_total == before.prompt_tokens_total
    out = engine.generate("Hello", {"max_new_tokens": 2, "regex": "[a-z]+"})  # still serving
    assert out["meta_info"]["finish_reason"] is not None


def test_what_xgrammar_cannot_take_runs_on_llguidance(engine):
    """xgrammar would take minutes to convert this pattern, and ignores multipleOf: the
    default backend (auto) sends both to llguidance, which enforces them."""
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[a-z]{1,30000}$"},
            "n": {"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 99},
        },
        "required": ["code", "n"],
        "additionalProperties": False,
    }
    out = engine.generate(
        input_ids=chat(engine, "Give a lowercase code and a multiple of three as JSON."),
        sampling_params={"max_new_tokens": 48, "json_schema": json.dumps(schema)},
    )
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        jsonschema.validate(json.loads(out["text"]), schema)
    else:  # cut off by max_new_tokens: every token so far was still allowed
        assert out["meta_info"]["finish_reason"]["type"] == "length"


# (kind, text) of the constraints the in-process scheduler below compiles
SLOW = ("json_schema", json.dumps(_POINT))
YES_NO = ("regex", "(yes|no)")
COLOR = ("regex", "(red|green|blue)")


@dataclasses.dataclass
class SlowCompile:
    """SLOW's compile: it starts, then waits for `gate`, which only the test sets."""

    gate: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: threading.Event = dataclasses.field(default_factory=threading.Event)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


@pytest.fixture
def gated_scheduler(default_model_dir, monkeypatch):
    """An in-process scheduler with a 1 s compile limit whose compiler never finishes SLOW
    while the test runs, and has YES_NO and COLOR compiled up front (a lookup, like a cache
    hit): SLOW certainly outlives the limit, the others certainly do not."""
    args = ServerArgs(
        model_path=default_model_dir,
        device="cpu",
        max_total_tokens=2048,
        grammar_backend="xgrammar",  # the compiler patched below is xgrammar's
        grammar_compile_timeout=1.0,
    )
    sched = Scheduler(args, default_model_dir)
    backend = sched.grammar
    real = backend._compile
    ready = {key: real(*key) for key in (YES_NO, COLOR)}  # outside any time limit
    slow = SlowCompile()

    def compile_(kind: str, text: str):
        if (kind, text) != SLOW:
            return ready[(kind, text)]
        slow.started.set()
        slow.gate.wait()
        slow.finished.set()
        return real(kind, text)

    monkeypatch.setattr(backend, "_compile", compile_)
    try:
        yield sched, slow
    finally:
        slow.gate.set()
        backend.shutdown()


def run_to_end(sched: Scheduler, requests: list[GenerateRequest]) -> dict[str, tuple]:
    """Step until every request finished: rid -> (output ids, finish reason)."""
    for request in requests:
        sched.add_request(request)
    results: dict[str, tuple] = {}
    hang_guard = time.monotonic() + 300  # a limit that never fires hangs the loop: fail
    while sched.has_work():
        assert time.monotonic() < hang_guard, "requests still unfinished after 300 s"
        sched.step()
        for out in sched.take_outputs():
            ids = results.get(out.rid, ([], None))[0] + out.new_token_ids
            results[out.rid] = (ids, out.finished_reason)
    return results


def constrained(rid: str, sched: Scheduler, constraint: tuple[str, str]) -> GenerateRequest:
    kind, text = constraint
    params = SamplingParams(temperature=0, max_new_tokens=8, **{kind: text})
    return GenerateRequest(rid, sched.tokenizer.encode("Hello"), params)


def test_grammar_failing_at_compile_time_aborts_only_its_request(gated_scheduler):
    sched, slow = gated_scheduler
    results = run_to_end(
        sched, [constrained("slow", sched, SLOW), constrained("yes-no", sched, YES_NO)]
    )
    assert slow.started.is_set() and not slow.finished.is_set()  # aborted mid-compile
    ids, reason = results["slow"]
    assert reason["type"] == "abort"
    assert "compile" in reason["message"]
    assert ids == []
    ids, reason = results["yes-no"]  # the same run, beside the stuck compile
    assert reason["type"] == "stop"
    assert sched.tokenizer.decode(ids, skip_special_tokens=True) in ("yes", "no")
    after = run_to_end(sched, [constrained("color", sched, COLOR)])  # and it keeps serving
    ids, reason = after["color"]
    assert reason["type"] == "stop"
    assert sched.tokenizer.decode(ids, skip_special_tokens=True) in ("red", "green", "blue")
