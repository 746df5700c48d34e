"""The primitives programs are written with: gen, select, the typed gens and the roles."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from loom.constrain.regex import check_regex
from loom.constrain.tools.formats import describe_tools
from loom.constrain.tools.grammar import check_parameters
from loom.constrain.tools.spec import ToolError, parse_tool_choice, parse_tools
from loom.lang.choices import ChoicesMethod, token_length_normalized
from loom.lang.errors import LoomError
from loom.lang.ir import (
    ROLES,
    Concat,
    Expr,
    Gen,
    GenParams,
    GenTools,
    RoleBegin,
    RoleEnd,
    Select,
    as_expr,
)

INT_REGEX = r"[-+]?[0-9]{1,18}"
FLOAT_REGEX = r"[-+]?[0-9]{1,18}(\.[0-9]{1,18})?([eE][-+]?[0-9]{1,3})?"
BOOL_REGEX = r"(True|False)"
STRING_REGEX = r'"([^"\\\n]|\\["\\/bfnrt])*"'
_DTYPE_REGEX = {int: INT_REGEX, float: FLOAT_REGEX, bool: BOOL_REGEX}


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: int | list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    ignore_eos: bool | None = None,
    seed: int | None = None,
    return_logprob: bool | None = None,
    top_logprobs_num: int | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    ebnf: str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod = token_length_normalized,
    dtype: type | None = None,
    split_literals: bool | None = None,
    tools: list[dict] | None = None,
    tool_choice: str | dict | None = None,
    parallel_tool_calls: bool | None = None,
) -> Expr:
    """Generate text into variable `name`. At most one of regex / json_schema (a dict, a JSON
    string or a pydantic model class) / ebnf / choices / dtype (int, float, bool, str).

    `split_literals` (on by default): text a regex or a JSON schema forces is sent as prompt
    text, and only the free parts are generated (a JSON schema's each as its own request);
    False sends the constraint whole, in one request.

    `tools` (OpenAI's function tools) with `tool_choice` ("auto", the default with tools;
    "required"; "none"; a tool's name or {"type": "function", "function": {"name": ...}})
    and `parallel_tool_calls` (default True): the model may (auto) or must (required, a
    name) call them, in its chat template's call format, the calls constrained to each
    tool's parameters schema. The variable holds the generated text; `s.tool_calls(name)`
    the parsed calls in OpenAI's shape, and the meta info `content` (the text outside the
    calls). Describe the tools in the prompt (loom.tools_prompt) unless the program does."""
    _check_name(name)
    given = {
        "regex": regex,
        "json_schema": json_schema,
        "ebnf": ebnf,
        "choices": choices,
        "dtype": dtype if dtype is not str else None,
    }
    offered = _tools(name, tools, tool_choice, parallel_tool_calls)
    given["tools"] = offered
    constraints = [k for k, v in given.items() if v is not None]
    if len(constraints) > 1:
        raise LoomError(f"gen {name!r}: give one constraint at most, got {constraints}")
    if choices is not None:
        return select(name, choices, choices_method=choices_method)
    if dtype is not None and dtype not in (int, float, bool, str):
        raise LoomError(f"gen {name!r}: dtype must be int, float, bool or str, got {dtype!r}")
    params = GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        stop=_strings(stop, "stop"),
        stop_token_ids=_ints(stop_token_ids),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
        regex=_regex(regex, name) if regex is not None else _DTYPE_REGEX.get(dtype),
        json_schema=None if json_schema is None else schema_text(json_schema),
        ebnf=ebnf,
    )
    dtype = dtype if dtype is not str else None
    return Gen(name, params, dtype, return_logprob, top_logprobs_num, split_literals, offered)


def tools_prompt(tools: list[dict]) -> str:
    """Text that describes `tools` to a model and asks for hermes-style calls (what the
    server writes into the system message when a chat template does not render tools)."""
    try:
        return describe_tools(parse_tools(tools))
    except ToolError as e:
        raise LoomError(f"tools_prompt: {e}") from None


def _tools(name: str | None, tools: Any, choice: Any, parallel: bool | None) -> GenTools | None:
    """A gen's tools, checked; None without tools or with tool_choice "none"."""
    if tools is None and choice is None:
        return None
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}  # a tool's name
    try:
        offered = parse_tools([] if tools is None else tools)
        picked = parse_tool_choice(choice, offered, parallel)
        check_parameters(offered)
    except ToolError as e:
        raise LoomError(f"gen {name!r}: {e}") from None
    return GenTools(offered, picked) if picked.calls_tools else None


def gen_int(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=int, **kwargs)


def gen_float(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=float, **kwargs)


def gen_bool(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=bool, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Expr:
    """A double-quoted string; the variable holds its (unescaped) content."""
    g = gen(name, regex=STRING_REGEX, **kwargs)
    assert isinstance(g, Gen)
    return dataclasses.replace(g, dtype=str)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod = token_length_normalized,
    temperature: float = 0.0,
) -> Expr:
    """Append the most likely of `choices` (scored by `choices_method`) into `name`."""
    _check_name(name)
    if temperature != 0.0:
        raise LoomError("select scores choices deterministically; temperature must be 0")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise LoomError(f"select {name!r}: choices must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise LoomError(f"select {name!r}: every choice must be a non-empty string")
    if len(set(choices)) != len(choices):
        raise LoomError(f"select {name!r}: choices must be distinct, got {list(choices)}")
    if not isinstance(choices_method, ChoicesMethod):
        raise LoomError(
            f"select {name!r}: choices_method must be loom.token_length_normalized, "
            "loom.greedy_token_selection or loom.unconditional_likelihood_normalized"
        )
    return Select(name, tuple(choices), choices_method)


def schema_text(schema: Any) -> str:
    """A JSON schema given as a dict, a JSON string or a pydantic model class -> JSON text."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as e:
            raise LoomError(f"json_schema is not valid JSON: {e}") from e
    else:
        parsed = schema
    if not isinstance(parsed, (dict, bool)):
        raise LoomError(
            "json_schema must be a dict, a JSON string or a pydantic model class, "
            f"got {type(schema).__name__}"
        )
    return schema if isinstance(schema, str) else json.dumps(parsed)


# ---- roles ---------------------------------------------------------------------------------


def role(name: str, content: Any = None) -> Expr:
    if name not in ROLES:
        raise LoomError(f"unknown role {name!r}; roles are {list(ROLES)}")
    if content is None:
        return Concat((RoleBegin(name), RoleEnd(name)))
    return Concat((RoleBegin(name), as_expr(content), RoleEnd(name)))


def system(content: Any = None) -> Expr:
    return role("system", content)


def user(content: Any = None) -> Expr:
    return role("user", content)


def assistant(content: Any = None) -> Expr:
    return role("assistant", content)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


# ---- argument checks -----------------------------------------------------------------------


def _check_name(name: Any) -> None:
    if name is not None and not (isinstance(name, str) and name):
        raise LoomError(f"a variable name must be a non-empty string, got {name!r}")


def _regex(regex: Any, name: str | None) -> str:
    try:
        return check_regex(regex)
    except ValueError as e:
        raise LoomError(f"gen {name!r}: {e}") from e


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) and v for v in values):
        raise LoomError(f"{what} must be a non-empty string or a list of them, got {value!r}")
    return values


def _ints(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, int) else tuple(value)
