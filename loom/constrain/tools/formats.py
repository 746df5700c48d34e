"""How a model writes a tool call, and which way a model's chat template asks for.

Every supported format writes one call as a JSON object `{"name": "<name>", "<args key>":
{...}}` inside an envelope:

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
                 (Qwen2.5, Hermes, and loom's fallback); parallel calls one per envelope.
                 Small Qwen2.5 models also write the bare object without the tags: that
                 is read (and, under tool_choice auto, constrained) as a call too.
    llama3_json  {"name": "f", "parameters": {...}}   (Llama 3.1-3.3's JSON tool calling);
                 parallel calls separated by "; "
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   (one list of calls)

The canonical spelling (exact spaces) is what the grammar forces; the parser reads any
whitespace the JSON allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom.constrain.tools.spec import Tool


@dataclass(frozen=True)
class Envelope:
    """What surrounds a call (for a list envelope: the list of calls)."""

    trigger: str  # the text that starts it, in output free to hold text too
    open: str  # canonical text before the call object (the grammar writes this)
    close: str  # canonical text after it
    open_re: str  # what the parser reads for `open` (any whitespace)
    close_re: str
    is_list: bool = False  # a JSON list of calls (Mistral)


@dataclass(frozen=True)
class ToolFormat:
    name: str
    args_key: str  # "arguments" or "parameters"
    envelopes: tuple[Envelope, ...]  # the first is the canonical one (forced calls)
    separator: str  # between two calls (inside the list for a list envelope)
    # The trigger is a special token, which a detokenizer skipping specials would drop.
    special_trigger: bool = False
    lead: str = ""  # a marker the model may write before a call (dropped from content)

    def call_head(self, name: str) -> str:
        """The canonical text of a call's JSON object up to its arguments."""
        return f'{{"name": "{name}", "{self.args_key}": '


_BARE = Envelope('{"name"', "", "", "", r"\s*;?")

HERMES = ToolFormat(
    "hermes",
    "arguments",
    (
        Envelope(
            "<tool_call>", "<tool_call>\n", "\n</tool_call>", r"<tool_call>\s*", r"\s*</tool_call>"
        ),
        _BARE,
    ),
    separator="\n",
)
LLAMA3_JSON = ToolFormat(
    "llama3_json", "parameters", (_BARE,), separator="; ", lead="<|python_tag|>"
)
MISTRAL = ToolFormat(
    "mistral",
    "arguments",
    (
        Envelope(
            "[TOOL_CALLS]", "[TOOL_CALLS][", "]", r"\[TOOL_CALLS\]\s*\[\s*", r"\s*\]", is_list=True
        ),
    ),
    separator=", ",
    special_trigger=True,
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def detect_format(template: str | None, vocab: frozenset[str] = frozenset()) -> ToolFormat:
    """The format a chat template teaches its model (its tool section and the way it
    renders past calls); hermes where it says nothing about tools."""
    text = template or ""
    if "<tool_call>" in text:
        return HERMES
    if "[TOOL_CALLS]" in text or "[TOOL_CALLS]" in vocab:
        return MISTRAL
    if '"parameters"' in text or "<|python_tag|>" in text:
        return LLAMA3_JSON
    return HERMES


def template_knows_tools(template: str | None) -> bool:
    """Whether the template renders `tools` itself (else loom describes them)."""
    return bool(template) and "tools" in template


def describe_tools(tools: tuple[Tool, ...]) -> str:
    """The tools and the hermes call format, as a system prompt (for chat templates that
    do not render tools themselves)."""
    listed = "\n".join(json.dumps(t.openai()) for t in tools)
    return (
        "You may call functions to answer. The functions, one JSON signature a line:\n"
        f"{listed}\n\nTo call one, write a JSON object with its name and arguments within "
        '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <name>, "arguments": '
        "<arguments object>}\n</tool_call>"
    )
