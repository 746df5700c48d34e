"""A gen offered tools (gen(tools=...)): the calls constrained by the tool-call grammar
in the format of the backend's chat template, and read back into the gen's meta info."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.constrain.tools.formats import ToolFormat, detect_format
from loom.constrain.tools.grammar import tool_call_ebnf
from loom.constrain.tools.parser import parse_tool_calls
from loom.lang.errors import LoomError
from loom.lang.ir import Gen

if TYPE_CHECKING:
    from loom.lang.executor import Executor


def prepare_tool_gen(ex: Executor, g: Gen, params: dict) -> ToolFormat:
    """Put the calls' grammar into params; the call format it uses."""
    assert g.tools is not None
    backend = ex.ctx.backend
    if not backend.capabilities.grammar or backend.capabilities.chat_api:
        raise LoomError(
            f"gen {g.name!r}: tools need a backend that enforces grammars on text it "
            f"continues (Engine or RuntimeEndpoint); {type(backend).__name__} does not"
        )
    template = backend.chat_template()
    fmt = detect_format(template.source if template is not None else None)
    if fmt.special_trigger:
        raise LoomError(
            f"gen {g.name!r}: the {fmt.name} tool-call format starts with a special token, "
            "which program text does not carry; use the OpenAI server for this model"
        )
    given = [k for k in ("regex", "json_schema", "ebnf") if k in params]
    if given:
        raise LoomError(f"gen {g.name!r}: tools constrain the output; drop {given[0]}")
    params["ebnf"] = tool_call_ebnf(fmt, g.tools.tools, g.tools.choice)
    return fmt


def tool_calls_meta(g: Gen, fmt: ToolFormat, text: str, meta: dict) -> dict:
    """The gen's meta info with `tool_calls` (OpenAI's shape), `content` (the text outside
    the calls) and `tool_call_errors` (why text that looked like a call is not one)."""
    assert g.tools is not None
    parsed = parse_tool_calls(text, fmt, frozenset(t.name for t in g.tools.tools))
    calls = [c.openai() for c in parsed.tool_calls]
    meta = {**meta, "tool_calls": calls, "content": parsed.content}
    return {**meta, "tool_call_errors": list(parsed.errors)}
