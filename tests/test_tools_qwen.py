"""A tool-calling loop with the official `openai` client against `loom serve` on the real
Qwen2.5-Coder-0.5B-Instruct, whose own chat template renders the tools and the history
(hermes `<tool_call>` format): auto, required (parallel), named and streamed answers, and
a history with calls and tool results that renders exactly as transformers renders it.
Slow on CPU (~1 s a decode step), so every request runs at once, in one batch, when the
module starts, and the tests read the answers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from loom.backends.runtime import Runtime
from loom.runtime.models.model_source import fetch_qwen25_coder_05b
from tests.test_server_tools import ADD

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city"}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers"}},
]
for tool in TOOLS:
    tool["function"]["parameters"] = SCHEMAS[tool["function"]["name"]]

WEATHER_Q = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
TWO_CITIES = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
ADD_Q = [{"role": "user", "content": "Use the add tool to add 2 and 3."}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
HISTORY = WEATHER_Q + [
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'},
]
REQUESTS = {
    "auto": dict(messages=WEATHER_Q, tool_choice="auto"),
    "auto_stream": dict(messages=WEATHER_Q, tool_choice="auto", stream=True),
    "parallel": dict(messages=TWO_CITIES, tool_choice="required"),
    "named": dict(messages=ADD_Q, tool_choice={"type": "function", "function": {"name": "add"}}),
    "history": dict(messages=HISTORY, tool_choice="auto", max_tokens=8),
}


@pytest.fixture(scope="module")
def answers():
    model_dir = fetch_qwen25_coder_05b()
    with Runtime(model_dir, device="cpu", max_total_tokens=8192, enable_jump_forward=True) as rt:
        client = openai.OpenAI(base_url=rt.url + "/v1", api_key="-", max_retries=0, timeout=600)

        def ask(kwargs: dict):
            args = dict(model=model_dir, tools=TOOLS, max_tokens=32, temperature=0)
            answer = client.chat.completions.create(**{**args, **kwargs})
            return list(answer) if kwargs.get("stream") else answer

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            return dict(zip(REQUESTS, pool.map(ask, REQUESTS.values()))) | {"dir": model_dir}


def check_calls(calls) -> list[str]:
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [c.function.name for c in calls]


def test_auto_reads_the_models_own_call(answers):
    choice = answers["auto"].choices[0]
    assert choice.finish_reason == "tool_calls"
    assert check_calls(choice.message.tool_calls) == ["get_weather"]
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"


def test_auto_stream_sends_the_same_call_in_pieces(answers):
    whole = answers["auto"].choices[0].message.tool_calls[0].function
    deltas = [d for c in answers["auto_stream"] for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == whole.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole.arguments
    assert answers["auto_stream"][-1].choices[0].finish_reason == "tool_calls"


def test_required_with_parallel_calls_gives_calls_that_validate(answers):
    choice = answers["parallel"].choices[0]
    assert set(check_calls(choice.message.tool_calls)) == {"get_weather"}
    cities = [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls]
    assert cities[0] == "Paris"


def test_named_function_is_called_with_valid_arguments(answers):
    choice = answers["named"].choices[0]
    assert choice.finish_reason == "tool_calls"
    assert check_calls(choice.message.tool_calls) == ["add"]
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 2, "b": 3}


def test_history_renders_as_transformers_renders_it(answers):
    tokenizer = AutoTokenizer.from_pretrained(answers["dir"])
    call = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [*HISTORY[:1], {**HISTORY[1], "tool_calls": [call]}, HISTORY[2]]
    prompt = tokenizer.apply_chat_template(
        history, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    answer = answers["history"]
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.choices[0].message.content  # the model answers from the tool's result
