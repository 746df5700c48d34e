"""What each expression does to an executor's state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loom.lang.executor import Executor
from loom.lang.generation import run_gen, run_select
from loom.lang.ir import Gen, Join, RoleBegin, RoleEnd, Select, Text, VarScopeBegin, VarScopeEnd


def execute(ex: Executor, expr: Any) -> None:
    try:
        handler = _HANDLERS[type(expr)]
    except KeyError:
        raise TypeError(f"cannot run a {type(expr).__name__} expression") from None
    handler(ex, expr)


def _text(ex: Executor, e: Text) -> None:
    ex.append(e.value)


def _role_begin(ex: Executor, e: RoleBegin) -> None:
    first = not ex.messages and not ex.text
    ex.append(ex.ctx.roles.prefix(e.role, first))
    ex.role, ex.role_start = e.role, len(ex.text)


def _role_end(ex: Executor, e: RoleEnd) -> None:
    ex.messages.append({"role": e.role, "content": ex.text[ex.role_start :]})
    ex.append(ex.ctx.roles.suffix(e.role))
    ex.role = None


def _scope_begin(ex: Executor, e: VarScopeBegin) -> None:
    ex.scopes[e.name] = len(ex.text)


def _scope_end(ex: Executor, e: VarScopeEnd) -> None:
    start = ex.scopes.pop(e.name, len(ex.text))
    ex.set_var(e.name, ex.text[start:])


def _join(ex: Executor, e: Join) -> None:
    branches: tuple[Executor, ...] = e.branches
    for b in branches:
        b.sync()
    if e.mode == "concat":
        for b in branches:
            ex.append(b.text[b.fork_base :])
        return
    names: dict[str, None] = {}
    for b in branches:
        names.update(dict.fromkeys(b.new_variables()))
    for name in names:
        ex.set_var(
            name, [b.variables.get(name) for b in branches], [b.meta.get(name) for b in branches]
        )


_HANDLERS: dict[type, Callable[[Executor, Any], None]] = {
    Text: _text,
    RoleBegin: _role_begin,
    RoleEnd: _role_end,
    VarScopeBegin: _scope_begin,
    VarScopeEnd: _scope_end,
    Gen: run_gen,
    Select: run_select,
    Join: _join,
}
