"""The history of a chat with tools as the chat template receives it: calls with their
arguments as objects (templates write them with tojson), tool results with their call id,
and, for a template that does not render tools, the tools described in the system
message and past calls written into the assistant's content in the hermes format."""

from __future__ import annotations

import pytest

from loom.constrain.tools.formats import HERMES
from loom.constrain.tools.spec import parse_tool_choice, parse_tools
from loom.runtime.http.errors import APIError
from loom.runtime.http.openai_protocol import ChatMessage
from loom.runtime.http.openai_tools import ChatTools, conversation

NATIVE = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"
TOOLS = parse_tools([{"type": "function", "function": {"name": "add"}}])
CHAT_TOOLS = ChatTools(TOOLS, parse_tool_choice("auto", TOOLS), HERMES)
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
HISTORY = [
    ChatMessage(role="user", content="add"),
    ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [CALL]}),
    ChatMessage(role="tool", tool_call_id="c1", content="1"),
]


def test_native_template_gets_tools_and_calls_with_object_arguments():
    messages, kwargs = conversation(HISTORY, CHAT_TOOLS, NATIVE)
    assert kwargs == {"tools": [TOOLS[0].openai()]}
    call = messages[1]["tool_calls"][0]
    assert call == {
        "id": "c1",
        "type": "function",
        "function": {"name": "add", "arguments": {"a": 1}},
    }
    assert messages[1]["content"] is None
    assert messages[2] == {"role": "tool", "content": "1", "tool_call_id": "c1"}


def test_plain_template_gets_a_tool_prompt_and_calls_as_text():
    messages, kwargs = conversation(HISTORY, CHAT_TOOLS, PLAIN)
    assert kwargs == {}
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    )


def test_a_tool_result_without_its_call_id_is_refused():
    with pytest.raises(APIError, match="tool_call_id") as e:
        conversation([ChatMessage(role="tool", content="1")], None, NATIVE)
    assert e.value.status == 400 and e.value.param == "messages[0].tool_call_id"
