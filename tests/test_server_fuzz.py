"""Arbitrary JSON bodies against one live `loom serve` on a tiny Llama (issue 17): the
native /generate and the OpenAI /v1/completions and /v1/chat/completions answer every body
with a 2xx, or a 4xx in the API's error shape; never a 5xx, never a dropped connection;
and a good request right after still works.

Bodies are valid-looking requests (some fields set to values each may take: n, logprobs,
streams, stops, seeds, constraints), the same with a field or two replaced by any JSON
value, and plain random JSON: any nesting, huge and negative integers, NaN and infinities
as Python's JSON writes them, lone surrogates as \\u escapes, unknown fields. The server's
context is 64 tokens, so any request that is accepted finishes in a few steps."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.backends.runtime import Runtime
from tests.http_helpers import sse_events
from tests.tiny_models import VOCAB

WAIT_S = 60  # bounds answers that only a hang would reach
SERVER_ARGS = dict(device="cpu", context_length=64, max_total_tokens=16384)
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")

# ---- JSON values ------------------------------------------------------------------------

_EDGE_INTS = [-1, 0, 1, VOCAB - 1, VOCAB, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
_EDGE_FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 1e-320, 1e308]
_EDGE_TEXTS = ["", "t5 t6", "\ud800", "a\udfffb", "\ud83d\ude00", "\x00", "</s>", "t5 " * 40]

_EDGE_OBJECTS = [
    {},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
    {"type": "string", "maxLength": 2**63},
    {"include_usage": True},
    {"role": "user", "content": "t5"},
    {"role": "assistant", "content": None},
]
_TEXT = st.text(st.characters(codec=None) | st.characters(categories=["Cs"]), max_size=12)
_WORDS = st.lists(st.integers(0, VOCAB + 5).map("t{}".format), max_size=6).map(" ".join)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=400),
    st.integers(),
    st.sampled_from(_EDGE_INTS),
    st.floats(),
    st.sampled_from(_EDGE_FLOATS),
    _TEXT,
    _WORDS,
    st.sampled_from(_EDGE_TEXTS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=10,
)
# Values of the right type for many fields and the wrong size: what passes a type check
# and reaches the code behind it.
plausible = st.one_of(
    st.integers(-2, 80),
    st.sampled_from(_EDGE_INTS),
    st.floats(-3, 3),
    st.sampled_from(_EDGE_FLOATS),
    st.booleans(),
    _WORDS,
    st.sampled_from(_EDGE_TEXTS),
    st.sampled_from(_EDGE_OBJECTS),
    st.lists(st.integers(-1, VOCAB + 5) | st.sampled_from(_EDGE_INTS), min_size=1, max_size=4),
    st.lists(_WORDS | st.sampled_from(_EDGE_TEXTS), min_size=1, max_size=3),
    st.lists(st.sampled_from(_EDGE_OBJECTS), min_size=1, max_size=3),
)
field_values = st.one_of(plausible, plausible, json_values)

# ---- valid-looking requests -------------------------------------------------------------

_SCHEMAS = [
    {"type": "string", "maxLength": 3},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"enum": ["t5", "t6"]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
]
_SOME_WORDS = _WORDS.filter(bool)
_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
_STOPS = _SOME_WORDS | st.lists(_SOME_WORDS, max_size=2)
_SHARED = {  # SGLang's sampling names, native and OpenAI extra-body alike
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.sampled_from([-1, 1, 5, VOCAB, 2**63]),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "stop": _STOPS,
    "stop_token_ids": st.lists(st.integers(0, VOCAB + 5), max_size=3),
    "ignore_eos": st.booleans(),
    "n": st.integers(1, 4),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "regex": st.sampled_from(["t[5-9]", "(t5 )+t6", "[a-z]{1,3}", "yes|no"]),
    "ebnf": st.sampled_from(['root ::= "t5" | "t6"', "root ::= [a-z]+"]),
    "no_stop_trim": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
_NATIVE_SAMPLING = {
    **_SHARED,
    "max_new_tokens": st.integers(0, 70),
    "min_new_tokens": st.integers(0, 3),
    "json_schema": st.sampled_from(_SCHEMAS),
    "json_object": st.booleans(),
}
_OPENAI = {
    **_SHARED,
    "max_tokens": st.integers(0, 10),
    "min_tokens": st.integers(0, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}]
        + [{"type": "json_schema", "json_schema": {"name": "x", "schema": s}} for s in _SCHEMAS]
    ),
    "user": st.text(max_size=5),
    "rid": st.text("abc-01", min_size=1, max_size=5),
}
_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": _WORDS
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _WORDS}), max_size=2),
    }
)
_CALL = {"id": "call_1", "type": "function", "function": {"name": "t5", "arguments": '{"a": 1}'}}
_HISTORY = st.sampled_from(
    [
        {"role": "assistant", "content": None, "tool_calls": [_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "t6"},
        {"role": "tool", "content": "t6"},  # no tool_call_id
    ]
)
_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["t5", "t6"]), "parameters": st.sampled_from(_SCHEMAS)}
        ),
    }
)
_TOOL_CHOICES = ["none", "auto", "required"] + [
    {"type": "function", "function": {"name": n}} for n in ("t5", "t6", "missing")
]
# Per route: each field a valid-looking request may set, with the values it may take.
VALID = {
    "/generate": {
        "text": _SOME_WORDS | st.lists(_SOME_WORDS, min_size=1, max_size=3),
        "input_ids": _IDS | st.lists(_IDS, min_size=1, max_size=3),
        "rid": st.text("abc-01", min_size=1, max_size=5) | st.lists(st.text("ab", max_size=2)),
        "stream": st.booleans(),
        "return_logprob": st.booleans(),
        "logprob_start_len": st.integers(-1, 1),
        "top_logprobs_num": st.integers(0, 5),
        "return_text_in_logprobs": st.booleans(),
        **{f"sampling_params.{k}": v for k, v in _NATIVE_SAMPLING.items()},
    },
    "/v1/completions": {
        **_OPENAI,
        "prompt": _SOME_WORDS | st.lists(_SOME_WORDS, min_size=1, max_size=3) | _IDS,
        "logprobs": st.integers(0, 5),
        "echo": st.just(False),
        "best_of": st.integers(1, 4),
    },
    "/v1/chat/completions": {
        **_OPENAI,
        "messages": st.lists(_MESSAGE | _HISTORY, min_size=1, max_size=3),
        "max_completion_tokens": st.integers(0, 10),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "add_generation_prompt": st.booleans(),
        "continue_final_message": st.booleans(),
        "chat_template_kwargs": st.dictionaries(st.sampled_from(["x", "tools"]), st.booleans()),
        "tools": st.lists(_TOOL, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(_TOOL_CHOICES),
        "parallel_tool_calls": st.booleans(),
    },
}
# Where a broken value may go: every field above, and a few more.
FIELDS = {
    "/generate": [*VALID["/generate"], "sampling_params", "unknown_field"],
    "/v1/completions": [*VALID["/v1/completions"], "model", "suffix", "unknown_field"],
    "/v1/chat/completions": [
        *VALID["/v1/chat/completions"], "model", "messages.0", "messages.0.role",
        "messages.0.content", "messages.0.tool_calls", "tools.0", "tools.0.function.parameters",
        "unknown_field",
    ],
}  # fmt: skip


def good_body(route: str, model: str) -> dict:
    if route == "/generate":
        return {"text": "t5 t6", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    if route == "/v1/completions":
        return {"model": model, "prompt": "t5 t6", "max_tokens": 2}
    return {"model": model, "messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 2}


def _set(body: dict, path: str, value) -> dict:
    """`body` with the field at `path` (dots: nested keys, digits: list indices) set."""
    *outer, last = path.split(".")
    target = body
    for key in outer:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


@st.composite
def valid_bodies(draw, route: str, model: str) -> dict:
    """The good body with some fields set to values each could take."""
    body = copy.deepcopy(good_body(route, model))
    fields = draw(st.lists(st.sampled_from(sorted(VALID[route])), max_size=4, unique=True))
    for path in fields:
        if path == "input_ids":
            del body["text"]  # one prompt field at a time
        _set(body, path, draw(VALID[route][path]))
    return body


@st.composite
def broken_bodies(draw, route: str, model: str) -> dict:
    """A valid-looking body with one field (or two) set to any JSON value."""
    body = draw(valid_bodies(route, model))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(FIELDS[route]))
        try:
            _set(body, path, draw(field_values))
        except (KeyError, IndexError, TypeError, ValueError):  # its outer field was replaced
            pass
    return body


@st.composite
def requests(draw, model: str) -> tuple[str, dict | object]:
    route = draw(st.sampled_from(ROUTES))
    body = draw(
        st.one_of(
            valid_bodies(route, model),
            broken_bodies(route, model),
            broken_bodies(route, model),
            st.dictionaries(st.sampled_from(FIELDS[route]) | _TEXT, field_values),
            json_values,
        )
    )
    return route, body


# ---- the server and the test ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama, tmpdir_env, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "words.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with Runtime(tiny_llama, **SERVER_ARGS, chat_template=str(template)) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"], r.text
        assert error["type"] == "invalid_request_error", r.text
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = list(sse_events(r.text.splitlines()))
        assert events[-1] == "[DONE]", r.text
        errors = [e["error"] for e in events[:-1] if "error" in e]
        assert all(e["type"] == "invalid_request_error" for e in errors), errors
    else:
        r.json()


# Bodies the fuzzing found answered with a 5xx, each once killing the scheduler.
FOUND = [
    (  # a grammar no token of this vocabulary can write, with top_k: the sampler read
        # index -1 of a row whose every token was masked
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "t5 t6"}],
            "max_tokens": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array"}},
            },
            "top_k": 5,
        },
    ),
]


@pytest.mark.parametrize("route, body", FOUND)
def test_bodies_that_once_got_a_5xx_get_a_2xx_or_a_4xx(client, model, route, body):
    answer = client.post(route, json=body)
    check_answer(answer)
    assert "tokenizer cannot write" in answer.text  # says what to fix
    assert client.post(route, json=good_body(route, model)).status_code == 200


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_body_gets_a_2xx_or_a_4xx_and_the_server_goes_on(client, model, data):
    route, body = data.draw(requests(model))
    content = json.dumps(body)  # escapes surrogates; writes NaN / Infinity bare
    headers = {"Content-Type": "application/json"}
    check_answer(client.post(route, content=content, headers=headers))
    after = client.post(route, json=good_body(route, model))
    assert after.status_code == 200, after.text
