"""Tool calling on /v1/chat/completions: the request's tools and tool_choice, the history's
calls and tool results as the chat template reads them, the constraint of the calls, and
the calls read back out of the output (whole or streamed) in OpenAI's shape.

Decisions where OpenAI leaves room:
- tool_choice "none" leaves the tools out of the prompt as well: the model is not asked
  to call what it may not call, so its text never holds a stray call.
- The call format is the chat template's own (formats.detect_format). A template that
  does not render `tools` gets them described in the system message, in the hermes
  format, and past calls written into the assistant's content in that format.
- auto, required and named calls are all constrained (grammar.py); named means one call.
- A call the model writes that does not parse stays in `content` (logged), never a 5xx.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from loom.constrain.tools.formats import (
    HERMES,
    ToolFormat,
    describe_tools,
    detect_format,
    template_knows_tools,
)
from loom.constrain.tools.grammar import check_parameters, tool_call_ebnf
from loom.constrain.tools.parser import ToolCallStream, parse_tool_calls
from loom.constrain.tools.spec import (
    Tool,
    ToolChoice,
    ToolError,
    parse_tool_choice,
    parse_tools,
)
from loom.runtime.http.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTools:
    """The tools of one chat request, checked; None stands for a request without tools."""

    tools: tuple[Tool, ...]
    choice: ToolChoice
    fmt: ToolFormat

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    def sampling(self) -> dict:
        """The sampling parameters that constrain the calls."""
        params: dict[str, Any] = {"ebnf": tool_call_ebnf(self.fmt, self.tools, self.choice)}
        if self.fmt.special_trigger:  # keep the trigger token in the text the parser reads
            params["skip_special_tokens"] = False
        return params

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole output, and its finish reason."""
        parsed = parse_tool_calls(text, self.fmt, self.names)
        if parsed.errors:
            logger.warning("output kept as content: %s", "; ".join(parsed.errors))
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = [c.openai() for c in parsed.tool_calls]
            reason = "tool_calls" if reason == "stop" else reason
        return message, reason

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.fmt, self.names)


def stream_delta(stream: ToolCallStream, text: str, reason: str | None) -> tuple[dict, str | None]:
    """The delta of one streamed chunk, and its finish reason."""
    content, calls = stream.feed(text, final=reason is not None)
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    if stream.called and reason == "stop":
        reason = "tool_calls"
    return delta, reason


def chat_tools(
    tools: Any, tool_choice: Any, parallel: bool | None, fmt: ToolFormat
) -> ChatTools | None:
    """The request's tools, or None when it offers none or tool_choice is "none"; a
    ToolError becomes a 400 naming the field."""
    if tools is None and tool_choice in (None, "none", "auto"):
        return None
    try:
        offered = parse_tools([] if tools is None else tools)
        choice = parse_tool_choice(tool_choice, offered, parallel)
        if not choice.calls_tools:
            return None
        check_parameters(offered)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from e
    return ChatTools(offered, choice, fmt)


def chat_format(template: str | None, vocab: dict[str, int]) -> ToolFormat:
    return detect_format(template, frozenset(t for t in ("[TOOL_CALLS]",) if t in vocab))


# ---- the conversation the template renders ----------------------------------------------


def conversation(messages: list, tools: ChatTools | None, template: str) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) of a request's history."""
    native = template_knows_tools(template)
    rendered = [_message(m, i, native) for i, m in enumerate(messages)]
    if tools is None:
        return rendered, {}
    if native:
        return rendered, {"tools": [t.openai() for t in tools.tools]}
    return _with_tool_prompt(rendered, tools.tools), {}


def _message(m, index: int, native: bool) -> dict:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.role == "tool":
        if m.tool_call_id is None:
            raise APIError(
                400,
                f"messages[{index}] is a tool result without tool_call_id; give the id of "
                "the call it answers",
                param=f"messages[{index}].tool_call_id",
            )
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(
                400,
                f"messages[{index}] has tool_calls but role {m.role!r}; only assistant "
                "messages hold calls",
                param=f"messages[{index}].tool_calls",
            )
        calls = [_past_call(c, index, j) for j, c in enumerate(m.tool_calls)]
        if native:
            out["content"] = m.text() or None
            out["tool_calls"] = calls
        else:
            written = [_written_call(c["function"]) for c in calls]
            out["content"] = "\n".join([m.text(), *written] if m.text() else written)
    return out


def _past_call(call, index: int, j: int) -> dict:
    """A call of the history, arguments as an object: templates write them with tojson."""
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"messages[{index}].tool_calls[{j}].function.arguments is not JSON ({e}); send "
            "the arguments the call was made with, as a JSON string",
            param=f"messages[{index}].tool_calls[{j}].function.arguments",
        ) from e
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def _written_call(function: dict) -> str:
    envelope, head = HERMES.envelopes[0], HERMES.call_head(function["name"])
    return f"{envelope.open}{head}{json.dumps(function['arguments'])}}}{envelope.close}"


def _with_tool_prompt(messages: list[dict], tools: tuple[Tool, ...]) -> list[dict]:
    """The tools described in the system message, for templates that do not render them."""
    prompt = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
