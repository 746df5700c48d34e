"""Tool-call output -> content and calls, on the formats' real strings: whole outputs,
every prefix of a stream (what a stream sends adds up to what the whole output gives),
and malformed calls (kept as content with a reason, never an exception)."""

from __future__ import annotations

import json

import pytest

from loom.constrain.tools.formats import HERMES, LLAMA3_JSON, MISTRAL, detect_format
from loom.constrain.tools.parser import ToolCallStream, parse_tool_calls

NAMES = frozenset({"get_weather", "add"})
WEATHER = '{"city": "Paris"}'
ADD = '{"a": 1, "b": 2}'

# (format, output, content, [(name, arguments)])
CASES = [
    (
        HERMES,
        f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n'
        f'</tool_call>\n<tool_call>\n{{"name": "add", "arguments": {ADD}}}\n</tool_call>',
        "Let me check.",
        [("get_weather", WEATHER), ("add", ADD)],
    ),
    (HERMES, f'{{"name": "add", "arguments": {ADD}}}', None, [("add", ADD)]),  # bare, Qwen-small
    (
        HERMES,
        f'<tool_call>{{ "name" : "add",\n "arguments":{ADD} }}</tool_call> done',
        "done",
        [("add", ADD)],
    ),
    (
        LLAMA3_JSON,
        f'<|python_tag|>{{"name": "add", "parameters": {ADD}}}; '
        f'{{"name": "get_weather", "parameters": {WEATHER}}}',
        None,
        [("add", ADD), ("get_weather", WEATHER)],
    ),
    (
        MISTRAL,
        f'[TOOL_CALLS][{{"name": "add", "arguments": {ADD}}}, '
        f'{{"name": "get_weather", "arguments": {WEATHER}}}]',
        None,
        [("add", ADD), ("get_weather", WEATHER)],
    ),
    (HERMES, "Paris is sunny today.", "Paris is sunny today.", []),
    (MISTRAL, "No call {here}.", "No call {here}.", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_whole_output_splits_into_content_and_calls(fmt, text, content, calls):
    parsed = parse_tool_calls(text, fmt, NAMES)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert parsed.errors == ()
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    assert len({c.id for c in parsed.tool_calls}) == len(calls)


def test_a_call_in_another_key_order_is_read():
    text = f'<tool_call>\n{{"arguments": {ADD}, "name": "add"}}\n</tool_call>'
    (call,) = parse_tool_calls(text, HERMES, NAMES).tool_calls
    assert call.name == "add" and json.loads(call.arguments) == json.loads(ADD)


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_stream_pieces_add_up_to_the_whole_output(fmt, text, content, calls):
    stream = ToolCallStream(fmt, NAMES)
    shown, streamed = "", {}
    for i in range(len(text)):  # one character at a time: every prefix is seen
        piece, deltas = stream.feed(text[i], final=i == len(text) - 1)
        shown += piece
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(streamed) and d["type"] == "function"
                streamed[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
            else:
                streamed[d["index"]][1] += d["function"]["arguments"]
    assert shown == (content or "")
    assert [tuple(v) for v in streamed.values()] == calls


def test_stream_holds_back_what_may_start_a_call():
    stream = ToolCallStream(HERMES, NAMES)
    assert stream.feed("Sure <tool", final=False) == ("Sure", [])
    piece, deltas = stream.feed('_call>\n{"name": "add", "arguments": {"a"', final=False)
    assert piece == ""
    assert deltas == [
        {
            "index": 0,
            "id": stream.ids[0],
            "type": "function",
            "function": {"name": "add", "arguments": '{"a"'},
        }
    ]
    assert stream.feed(": 1}}\n</tool_call>", final=True) == (
        "",
        [{"index": 0, "function": {"arguments": ": 1}"}}],
    )


def test_stream_releases_a_held_back_trigger_start_that_was_text():
    stream = ToolCallStream(HERMES, NAMES)
    assert stream.feed("a <tool", final=False)[0] == "a"
    assert stream.feed("box>", final=True)[0] == " <toolbox>"


MALFORMED = [
    ('<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', "'delete_all'"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1,', "not complete JSON"),
    ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', "not a JSON object"),
    ('<tool_call>\n{"name": "add", "arguments": {}} trailing\n</tool_call>', "not closed"),
    ("<tool_call>\nnot json at all\n</tool_call>", "not a JSON object"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}', "does not end"),
]


@pytest.mark.parametrize("text, reason", MALFORMED)
def test_malformed_call_stays_content_with_a_reason(text, reason):
    parsed = parse_tool_calls(text, HERMES, NAMES)
    assert parsed.tool_calls == ()
    assert parsed.content == text
    assert len(parsed.errors) == 1 and reason in parsed.errors[0]


def test_malformed_call_does_not_hide_a_good_one_after_it():
    bad = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    good = f'<tool_call>\n{{"name": "add", "arguments": {ADD}}}\n</tool_call>'
    parsed = parse_tool_calls(bad + "\n" + good, HERMES, NAMES)
    assert [c.name for c in parsed.tool_calls] == ["add"]
    assert parsed.content == bad and len(parsed.errors) == 1


def test_format_is_detected_from_the_chat_template():
    assert detect_format("... <tool_call>\\n{{ tool_call.name }} ...") is HERMES
    assert detect_format("{{ '[TOOL_CALLS]' }}") is MISTRAL
    assert detect_format("", frozenset({"[TOOL_CALLS]"})) is MISTRAL
    llama = '{"name": function name, "parameters": dictionary of argument name and its value}'
    assert detect_format(llama) is LLAMA3_JSON
    assert detect_format("{{ messages }}") is HERMES  # no tool section: loom's fallback
