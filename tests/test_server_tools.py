"""OpenAI tool calling through the official `openai` client against a live `loom serve` on
the embedded SmolLM2-135M-Instruct. Its chat template knows nothing of tools, so loom
describes them in the system message and reads calls in the hermes format: required
calls are constrained and always validate (jsonschema as the reference), streams add up
to the whole answer, history with calls and tool results renders, and bad input is a 400
that names what to fix. (test_tools_qwen runs auto, parallel and named calls on a model
whose own template renders tools.)"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import loom
from loom.backends.runtime import Runtime

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n}", "parameters": s}}
    for n, s in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(default_model_dir):
    with Runtime(default_model_dir, device="cpu", max_total_tokens=8192) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def ask(client, model, **kwargs):
    args = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=64, temperature=0)
    return client.chat.completions.create(**{**args, **kwargs})


@pytest.fixture(scope="module")
def required_one(client, model):
    """A required single call, whole (the stream test compares with it)."""
    return ask(client, model, tool_choice="required", parallel_tool_calls=False).choices[0]


def check_calls(calls) -> None:
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_returns_a_call_whose_arguments_validate(required_one):
    choice = required_one
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.content is None
    check_calls(choice.message.tool_calls)


def test_stream_deltas_add_up_to_the_whole_answer(client, model, required_one):
    args = dict(tool_choice="required", parallel_tool_calls=False)
    whole = required_one
    chunks = list(ask(client, model, **args, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.id is not None:  # the first delta of a call: index, id, type and name
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert len([c for c in chunks if c.choices[0].delta.tool_calls]) > len(calls)  # in pieces
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls
    ]
    assert list(calls.values()) == expected
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_history_with_calls_and_tool_results_is_answered(client, model):
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = ask(client, model, messages=history, max_tokens=4, tool_choice="auto")
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 0


def test_tool_choice_none_answers_in_text(client, model):
    choice = ask(client, model, tool_choice="none", max_tokens=4).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "mul"}}}, "'mul'"),
    ({"tools": {"type": "function"}}, "tools"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
            ]
        },
        "schema of an object",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"patternProperties": {"x": {}}}},
                }
            ]
        },
        "'patternProperties'",
    ),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (
        {"messages": ASK + [{"role": "tool", "content": "21"}]},
        "tool_call_id",
    ),
    (
        {
            "messages": ASK
            + [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "add", "arguments": "{"},
                        }
                    ],
                }
            ]
        },
        "arguments is not JSON",
    ),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_tool_input_is_a_400_that_says_what_to_fix(client, model, change, message):
    with pytest.raises(openai.BadRequestError, match=message) as e:
        ask(client, model, **change)
    assert e.value.status_code == 400


# ---- the language: gen(tools=...) ---------------------------------------------------------


@loom.function
def weather_agent(s, question):
    s += loom.system(loom.tools_prompt(TOOLS))
    s += loom.user(question)
    call = loom.gen("call", tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    s += loom.assistant(call)


def test_a_program_reads_the_calls_of_a_gen_offered_tools(server):
    backend = loom.RuntimeEndpoint(server.url)
    state = weather_agent.run("What is the weather in Paris?", backend=backend, temperature=0)
    (call,) = state.tool_calls("call")
    assert call["id"].startswith("call_") and call["type"] == "function"
    jsonschema.validate(
        json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]]
    )
    assert state.get_meta_info("call")["content"] is None
    assert "<tool_call>" in state["call"]  # the variable holds the text the model wrote


def test_gen_refuses_a_tool_choice_naming_no_tool():
    with pytest.raises(loom.LoomError, match="'mul'"):
        loom.gen("x", tools=TOOLS, tool_choice="mul")
