"""The tracer: runs a program on symbolic arguments and records its request graph.

Symbolic arguments and generated values can be appended (`s += question`, `"Q: " +
question`), but not looked into: formatting one into an f-string, branching on one,
comparing it, calling its methods raise TraceStop, and the trace ends there with the
reason recorded on the graph.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from loom.lang.errors import TraceStop
from loom.lang.graph import RequestGraph
from loom.lang.ir import (
    Expr,
    Gen,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    as_expr,
    leaves,
)
from loom.lang.state import ForkGroup, RoleTracker, StateBase


class _Symbolic(Expr):
    """A value the tracer cannot see into; only appending it is traceable."""

    __slots__ = ("name",)
    what = "value"

    def __init__(self, name: str):
        self.name = name

    def _stop(self, use: str) -> NoReturn:
        raise TraceStop(f"{self.what} {self.name!r} {use}")

    def __str__(self) -> str:
        self._stop("is converted to a string (str(), an f-string or format())")

    def __format__(self, spec: str) -> str:
        self._stop("is formatted into a string (an f-string or format())")

    def __bool__(self) -> bool:
        self._stop("decides a Python branch")

    def __eq__(self, other: object) -> bool:
        self._stop("is compared (a Python branch on it)")

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = object.__hash__

    def __len__(self) -> int:
        self._stop("is measured (len())")

    def __iter__(self) -> NoReturn:
        self._stop("is iterated")

    def __getitem__(self, key: Any) -> NoReturn:
        self._stop("is indexed")

    def __contains__(self, item: Any) -> bool:
        self._stop("is searched ('in')")

    def __int__(self) -> int:
        self._stop("is converted to a number")

    __float__ = __index__ = __int__

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("__") or attr == "name":
            raise AttributeError(attr)
        self._stop(f"is used as a value (.{attr})")

    def __repr__(self) -> str:
        return f"<symbolic {self.what} {self.name}>"


class SymbolicArg(_Symbolic):
    __slots__ = ()
    what = "argument"


class SymbolicValue(_Symbolic):
    __slots__ = ()
    what = "generated value"


class TracerState(StateBase):
    def __init__(
        self,
        graph: RequestGraph,
        branch: int = 0,
        last: int | None = None,
        roles: RoleTracker | None = None,
        counter: list[int] | None = None,
    ):
        self._graph = graph
        self._branch = branch
        self._last = last
        self._roles = roles or RoleTracker()
        self._counter = counter if counter is not None else [0]  # branch ids, shared
        self._defined: list[str] = []

    def __iadd__(self, other: Any) -> TracerState:
        parts = list(leaves(as_expr(other)))
        self._roles.check(parts)
        for part in parts:
            self._record(part)
        return self

    def _record(self, e: Expr) -> None:
        kind, label = _classify(e)
        constant = isinstance(e, (Text, RoleBegin, RoleEnd))
        node = self._graph.add(kind, label, self._branch, [self._last], e if constant else None)
        self._last = node.id
        if isinstance(e, SymbolicValue) and not self._graph.read(e.name, node.id):
            raise TraceStop(f"reads variable {e.name!r}, which nothing traced defines")
        if kind in ("gen", "select", "var_scope_end") and label:
            self._graph.define(label, node.id)
            self._defined.append(label)

    def __getitem__(self, name: str) -> SymbolicValue:
        return SymbolicValue(name)

    get_var = __getitem__

    def __setitem__(self, name: str, value: Any) -> None:
        raise TraceStop(f"sets variable {name!r} from Python")

    set_var = __setitem__

    def fork(self, n: int = 1) -> ForkGroup:
        node = self._graph.add("fork", str(n), self._branch, [self._last])
        self._last = node.id
        branches = []
        for _ in range(n):
            self._counter[0] += 1
            branches.append(
                TracerState(
                    self._graph,
                    self._counter[0],
                    node.id,
                    RoleTracker(self._roles.open),
                    self._counter,
                )
            )
        return ForkGroup(self, branches)

    def _join(self, branches: list[TracerState], mode: str) -> None:
        after = [self._last, *(b._last for b in branches)]
        node = self._graph.add("join", mode, self._branch, after)
        self._last = node.id
        for b in branches:
            for name in b._defined:
                self._graph.define(name, node.id)

    def _stop(self, use: str) -> NoReturn:
        raise TraceStop(f"{use}: the trace cannot see generated text")

    def text(self) -> NoReturn:
        self._stop("reads the state's text")

    def messages(self) -> NoReturn:
        self._stop("reads the state's messages")

    def get_meta_info(self, name: str) -> NoReturn:
        self._stop(f"reads the meta info of {name!r}")

    def text_iter(self, var_name: str | None = None) -> NoReturn:
        self._stop("streams the state's text")

    def __contains__(self, name: str) -> NoReturn:
        self._stop(f"tests whether {name!r} is set")

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None


def _classify(e: Expr) -> tuple[str, str]:
    if isinstance(e, Text):
        return "text", e.value
    if isinstance(e, SymbolicArg):
        return "arg", e.name
    if isinstance(e, SymbolicValue):
        return "var_read", e.name
    if isinstance(e, Gen):
        return "gen", e.name or ""
    if isinstance(e, Select):
        return "select", e.name or ""
    if isinstance(e, (RoleBegin, RoleEnd)):
        return ("role_begin" if isinstance(e, RoleBegin) else "role_end"), e.role
    if isinstance(e, (VarScopeBegin, VarScopeEnd)):
        return ("var_scope_begin" if isinstance(e, VarScopeBegin) else "var_scope_end"), e.name
    return type(e).__name__.lower(), ""


def trace_function(
    func: Callable, name: str, concrete: dict[str, Any], bound: dict[str, Any]
) -> RequestGraph:
    """Run `func` on a TracerState; parameters not in `concrete` / `bound` (and without a
    default) are symbolic."""
    graph = RequestGraph(name)
    args, kwargs = _symbolic_arguments(func, {**bound, **concrete})
    try:
        func(TracerState(graph), *args, **kwargs)
    except TraceStop as e:
        graph.stop_reason = f"{e} ({_program_line(e)})"
    except Exception as e:  # noqa: BLE001 - a traced program may fail on symbolic values
        graph.stop_reason = f"the program raised {type(e).__name__}: {e} ({_program_line(e)})"
    return graph


def _symbolic_arguments(func: Callable, given: dict[str, Any]) -> tuple[list, dict]:
    params = list(inspect.signature(func).parameters.values())[1:]
    args, kwargs = [], {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in given:
            value = given[p.name]
        elif p.default is not p.empty:
            value = p.default
        else:
            value = SymbolicArg(p.name)
        if p.kind is p.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[p.name] = value
    return args, kwargs


def _program_line(error: BaseException) -> str:
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if "/loom/lang/" not in f.filename
    ]
    if not frames:
        return "at the program's start"
    f = frames[-1]
    return f"at {f.filename}:{f.lineno} in {f.name}"
