"""The language's expressions: what `s += ...` appends to a program state.

Expressions are immutable values; `a + b` concatenates them (and plain strings). The
interpreter runs the leaves of a concatenation in order; the tracer records them as nodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from loom.constrain.tools.spec import Tool, ToolChoice

ROLES = ("system", "user", "assistant")


class Expr:
    __slots__ = ()

    def __add__(self, other: Any) -> Concat:
        return concat(self, other)

    def __radd__(self, other: Any) -> Concat:
        return concat(other, self)


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    if isinstance(value, (int, float)):
        return Text(str(value))
    raise TypeError(
        f"cannot add a {type(value).__name__} to a program: add text (str) or a loom "
        "expression (gen, select, a role, ...)"
    )


def concat(*items: Any) -> Concat:
    parts: list[Expr] = []
    for item in items:
        expr = as_expr(item)
        parts.extend(expr.parts if isinstance(expr, Concat) else (expr,))
    return Concat(tuple(parts))


def leaves(expr: Expr) -> Iterator[Expr]:
    if isinstance(expr, Concat):
        for part in expr.parts:
            yield from leaves(part)
    else:
        yield expr


@dataclass(frozen=True, eq=False)
class Text(Expr):
    value: str


@dataclass(frozen=True, eq=False)
class Concat(Expr):
    parts: tuple[Expr, ...]


@dataclass(frozen=True)
class GenParams:
    """A gen's own sampling parameters (SGLang's names); None inherits the run's default."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def merged(self, defaults: Mapping[str, Any]) -> dict:
        """The backend's sampling_params: own values over the run's defaults."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = defaults.get(f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


SAMPLING_KEYS = frozenset(f.name for f in fields(GenParams)) - {"regex", "json_schema", "ebnf"}


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    name: str | None
    params: GenParams
    dtype: type | None = None
    return_logprob: bool | None = None
    top_logprobs_num: int | None = None
    split_literals: bool | None = None  # None: the run's default (on)
    tools: GenTools | None = None  # tools offered to this gen (gen(tools=...))


@dataclass(frozen=True)
class GenTools:
    tools: tuple[Tool, ...]
    choice: ToolChoice


@dataclass(frozen=True, eq=False)
class Select(Expr):
    name: str | None
    choices: tuple[str, ...]
    method: Any  # a ChoicesMethod (loom.lang.choices)


@dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class Join(Expr):
    """Internal: wait for fork branches and gather their results into the parent."""

    branches: tuple[Any, ...]  # Executors
    mode: str


CONSTANT_LEAVES = (Text, RoleBegin, RoleEnd)


def describe(expr: Expr) -> str:
    """A short name for error messages."""
    if isinstance(expr, (Gen, Select)):
        kind = "gen" if isinstance(expr, Gen) else "select"
        return f"{kind} {expr.name!r}" if expr.name else kind
    if isinstance(expr, (RoleBegin, RoleEnd)):
        return f"{type(expr).__name__}({expr.role!r})"
    if isinstance(expr, Text):
        return f"text {expr.value[:30]!r}"
    return type(expr).__name__
