"""The grammar of a request's tool calls, as xgrammar EBNF.

Built with xgrammar's structural tags: each tool is a tag `<call head with its name>
<its arguments> <end>`, the arguments under loom's own JSON-schema grammar of the tool's
parameters (xgrammar_backend.json_schema_grammar: strict, declared order, JSON-only string
characters), so a call always parses and validates.

- auto: free text, and once the format's trigger appears (`<tool_call>`, `{"name"`,
  `[TOOL_CALLS]`) a call of one of the tools, then free text again (xgrammar's
  TagDispatch: the text outside calls costs no mask work beyond watching for the trigger).
- required: one call (more with parallel_tool_calls) of any of the tools, nothing else.
- named: one call of the named tool.

The structural tag is printed as EBNF, which the xgrammar backend compiles as any `ebnf`
constraint: requests carry it through the ordinary constraint path (SamplingParams.ebnf),
and the compile cache keys it by its text.
"""

from __future__ import annotations

import functools
import re

import xgrammar as xgr
from xgrammar.structural_tag import (
    GrammarFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from loom.constrain.base import GrammarError
from loom.constrain.tools.formats import Envelope, ToolFormat
from loom.constrain.tools.spec import Tool, ToolChoice, ToolError
from loom.constrain.xgrammar_backend import json_schema_grammar, validate_constraint


def check_parameters(tools: tuple[Tool, ...]) -> None:
    """Each tool's parameters compile under loom's grammar; else a ToolError naming the
    tool and the keyword."""
    for i, tool in enumerate(tools):
        problem = _parameters_problem(tool.parameters_json)
        if problem is not None:
            raise ToolError(
                f"tools[{i}] ({tool.name!r}): {problem}", f"tools[{i}].function.parameters"
            )


@functools.lru_cache(maxsize=1024)
def _parameters_problem(schema_text: str) -> str | None:
    """Why a parameters schema does not compile (cached: agents send the same tools with
    every request)."""
    try:
        validate_constraint("json_schema", schema_text)
    except GrammarError as e:
        return _reason(str(e))
    return None


def _reason(message: str) -> str:
    """A json_schema message, said of a tool's parameters (no lenient mode here: a call's
    arguments are always enforced)."""
    message = re.sub(r"^json_schema\b", "its parameters", message)
    return message.replace(" or set json_schema_lenient=true to validate afterwards", "")


@functools.lru_cache(maxsize=256)
def tool_call_ebnf(fmt: ToolFormat, tools: tuple[Tool, ...], choice: ToolChoice) -> str:
    """The EBNF text of the calls `choice` allows (check_parameters first)."""
    if not choice.calls_tools:
        raise ValueError("tool_choice none has no call grammar")
    offered = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    structural = StructuralTag(format=_calls_format(fmt, offered, choice))
    return str(xgr.Grammar.from_structural_tag(structural))


def _calls_format(fmt: ToolFormat, tools: list[Tool], choice: ToolChoice):
    one_call = not choice.parallel
    if choice.forced:  # the canonical envelope, from the first token on
        envelope = fmt.envelopes[0]
        if envelope.is_list:
            return _list(fmt, envelope, tools, one_call)
        return TagsWithSeparatorFormat(
            tags=[_call(fmt, envelope.open, envelope.close, t) for t in tools],
            separator=fmt.separator,
            at_least_one=True,
            stop_after_first=one_call,
        )
    tags = []
    for envelope in fmt.envelopes:
        if envelope.is_list:
            tags.append(_list(fmt, envelope, tools, one_call))
        else:
            tags += [_call(fmt, envelope.open, envelope.close, t) for t in tools]
    triggers = [e.trigger for e in fmt.envelopes]
    return TriggeredTagsFormat(triggers=triggers, tags=tags, stop_after_first=one_call)


def _list(fmt: ToolFormat, envelope: Envelope, tools: list[Tool], one_call: bool) -> TagFormat:
    calls = TagsWithSeparatorFormat(
        tags=[_call(fmt, "", "", t) for t in tools],
        separator=fmt.separator,
        at_least_one=True,
        stop_after_first=one_call,
    )
    return TagFormat(begin=envelope.open, content=calls, end=envelope.close)


def _call(fmt: ToolFormat, open: str, close: str, tool: Tool) -> TagFormat:
    arguments = GrammarFormat(grammar=str(json_schema_grammar(tool.parameters_json)))
    return TagFormat(begin=open + fmt.call_head(tool.name), content=arguments, end="}" + close)
