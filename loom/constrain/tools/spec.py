"""The tools a request offers and its tool choice, checked once: a bad one is a ToolError
naming the field and what to fix."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# OpenAI's rule for function names; it also keeps names out of the JSON escapes and the
# call formats' delimiters, so a name is written the same in every format.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}}

Mode = Literal["none", "auto", "required", "named"]


class ToolError(ValueError):
    """A tools / tool_choice value the caller must fix; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters_json: str  # the parameters' JSON schema, as text (hashable, cache key)

    @property
    def parameters(self) -> dict:
        return json.loads(self.parameters_json)

    def openai(self) -> dict:
        """The OpenAI shape, as chat templates read it (`tools=` of apply_chat_template)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: Mode
    name: str | None = None  # the forced function of mode "named"
    parallel: bool = True  # more than one call allowed (OpenAI's parallel_tool_calls)

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    @property
    def forced(self) -> bool:
        """Calls are all the output may hold (no free text)."""
        return self.mode in ("required", "named")


def parse_tools(value: Any) -> tuple[Tool, ...]:
    """OpenAI `tools` (a list of {"type": "function", "function": {...}}) -> Tools."""
    if not isinstance(value, list):
        raise ToolError(f"tools must be a list of tools, got {type(value).__name__}", "tools")
    tools = tuple(_tool(item, f"tools[{i}]") for i, item in enumerate(value))
    names = [t.name for t in tools]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ToolError(f"tools names {repeated} more than once; names must be unique", "tools")
    return tools


def _tool(item: Any, where: str) -> Tool:
    if not isinstance(item, dict) or item.get("type") != "function":
        raise ToolError(
            f'{where} must be {{"type": "function", "function": {{"name": ..., '
            '"parameters": {...}}}}; only function tools are supported',
            where,
        )
    function = item.get("function")
    if not isinstance(function, dict):
        raise ToolError(f"{where}.function must be an object with a name", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(
            f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
            f"{where}.function.name",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description must be a string", f"{where}.function")
    parameters = function.get("parameters")
    parameters = NO_PARAMETERS if parameters is None else parameters
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolError(
            f"{where}.function.parameters (tool {name!r}) must be a JSON schema of an object "
            '({"type": "object", "properties": {...}}): a call\'s arguments are an object',
            f"{where}.function.parameters",
        )
    # The caller's key order is kept: templates write the schema as given (tojson).
    return Tool(name, description, json.dumps(parameters))


def parse_tool_choice(
    value: Any, tools: tuple[Tool, ...], parallel: bool | None = None
) -> ToolChoice:
    """OpenAI `tool_choice` ("none", "auto", "required" or {"type": "function",
    "function": {"name": ...}}) against the offered tools. Unset: "auto" with tools, else
    "none", as OpenAI."""
    parallel = True if parallel is None else parallel
    if value is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise ToolError('tool_choice "required" needs tools; give `tools`', "tool_choice")
        return ToolChoice(value if tools else "none", parallel=parallel)
    name = _named(value)
    if not tools:
        raise ToolError(f"tool_choice names {name!r} but no tools were given", "tool_choice")
    if name not in {t.name for t in tools}:
        raise ToolError(
            f"tool_choice names {name!r}, which is not among the tools "
            f"{sorted(t.name for t in tools)}",
            "tool_choice",
        )
    return ToolChoice("named", name, parallel=False)


def _named(value: Any) -> str:
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise ToolError(
            'tool_choice must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}',
            "tool_choice",
        )
    return name
