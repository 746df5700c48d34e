"""`s`: the program state a program function writes to and reads from."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

from loom.lang.errors import CallSite, LoomError, RoleError
from loom.lang.executor import Executor
from loom.lang.ir import (
    Expr,
    Join,
    RoleBegin,
    RoleEnd,
    VarScopeBegin,
    VarScopeEnd,
    as_expr,
    leaves,
)

_JOIN_ALIASES = {"gather_variable": "gather", "concate_and_append": "concat"}  # SGLang's names


class RoleTracker:
    """Checks role markers as they are submitted (roles never nest), so a misuse raises at
    the program's own line."""

    def __init__(self, open_role: str | None = None):
        self.open = open_role

    def check(self, exprs: list[Expr]) -> None:
        current = self.open
        for e in exprs:
            if isinstance(e, RoleBegin):
                if current is not None:
                    raise RoleError(
                        f"cannot open role {e.role!r} inside role {current!r}: roles do not "
                        f"nest; close {current!r} first"
                    )
                current = e.role
            elif isinstance(e, RoleEnd):
                if current != e.role:
                    now = "no role is open" if current is None else f"role {current!r} is open"
                    raise RoleError(f"cannot close role {e.role!r}: {now}")
                current = None
        self.open = current


class ForkGroup:
    """The branches of `s.fork(n)`: `forks[i] += ...`, `forks += lambda i: ...`, `join()`."""

    def __init__(self, parent: Any, branches: list[Any]):
        self.parent = parent
        self.branches = branches

    def __getitem__(self, i: int) -> Any:
        return self.branches[i]

    def __setitem__(self, i: int, value: Any) -> None:
        if value is not self.branches[i]:  # `forks[i] += x` stores the same state back
            raise LoomError("fork branches cannot be replaced; use forks[i] += ...")

    def __len__(self) -> int:
        return len(self.branches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.branches)

    def __iadd__(self, other: Any) -> ForkGroup:
        for i, branch in enumerate(self.branches):
            branch += other(i) if callable(other) else other
        return self

    def join(self, mode: str = "gather") -> None:
        """`gather`: each branch's new variables become lists on the parent; `concat`: the
        branches' new text is appended to the parent in order."""
        mode = _JOIN_ALIASES.get(mode, mode)
        if mode not in ("gather", "concat"):
            raise LoomError(f"join mode must be 'gather' or 'concat', got {mode!r}")
        self.parent._join(self.branches, mode)


class StateBase:
    """What program states and tracer states share: the block forms of roles and scopes."""

    def __iadd__(self, other: Any) -> StateBase:
        raise NotImplementedError

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[StateBase]:
        self += RoleBegin(name)
        yield self
        self += RoleEnd(name)

    def system(self) -> contextlib.AbstractContextManager:
        return self.role("system")

    def user(self) -> contextlib.AbstractContextManager:
        return self.role("user")

    def assistant(self) -> contextlib.AbstractContextManager:
        return self.role("assistant")

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[StateBase]:
        """The text appended inside the block becomes variable `name`."""
        self += VarScopeBegin(name)
        yield self
        self += VarScopeEnd(name)


class ProgramState(StateBase):
    def __init__(self, executor: Executor, roles: RoleTracker | None = None):
        self._ex = executor
        self._roles = roles or RoleTracker()

    # ---- writing -------------------------------------------------------------------------

    def __iadd__(self, other: Any) -> ProgramState:
        parts = list(leaves(as_expr(other)))
        self._roles.check(parts)
        site = _call_site() if self._ex.threaded else None
        for part in parts:
            self._ex.submit(part, site)
        return self

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def set_var(self, name: str, value: Any) -> None:
        self._ex.sync()
        self._ex.set_var(name, value)

    def fork(self, n: int = 1) -> ForkGroup:
        """n branches that each continue this state's text; the shared prefix is sent to
        the backend once before they run (so its KV is computed once)."""
        if not isinstance(n, int) or n < 1:
            raise LoomError(f"fork needs a positive number of branches, got {n!r}")
        ex = self._ex
        ex.sync()
        if n > 1 and ex.ctx.backend.capabilities.cache and len(ex.text) > ex.seen:
            ex.ctx.backend.cache_prefix(ex.text)
            ex.seen = len(ex.text)
        branches = [ProgramState(ex.branch(), RoleTracker(self._roles.open)) for _ in range(n)]
        return ForkGroup(self, branches)

    def _join(self, branches: list[ProgramState], mode: str) -> None:
        self._ex.submit(Join(tuple(b._ex for b in branches), mode), _call_site())

    # ---- reading -------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        """The variable's value, waiting for it if it is still being generated."""
        return self._ex.wait_var(name)

    def get_var(self, name: str) -> Any:
        return self._ex.wait_var(name)

    def __contains__(self, name: str) -> bool:
        self._ex.sync()
        return name in self._ex.variables

    def get_meta_info(self, name: str) -> dict | None:
        """Tokens, cached tokens, finish reason (and logprobs / choice scores) of a gen or
        select."""
        self._ex.wait_var(name)
        return self._ex.meta.get(name)

    def tool_calls(self, name: str) -> list[dict]:
        """The calls a gen offered tools made, in OpenAI's shape ({"id", "type",
        "function": {"name", "arguments"}}, arguments as JSON text); [] when none."""
        return list((self.get_meta_info(name) or {}).get("tool_calls", []))

    def text(self) -> str:
        self._ex.sync()
        return self._ex.text

    def messages(self) -> list[dict]:
        self._ex.sync()
        return [dict(m) for m in self._ex.messages]

    def variables(self) -> dict[str, Any]:
        self._ex.sync()
        return dict(self._ex.variables)

    def sync(self) -> None:
        self._ex.sync()

    def error(self) -> BaseException | None:
        """The exception that stopped the program (None if it ran through); waits for it."""
        self._ex.sync(raise_error=False)
        return self._ex.error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text as it is written (of one variable if named); with `run(stream=True)` the
        pieces arrive while the program runs."""
        return self._ex.iter_text(var_name)

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        pieces = self._ex.iter_text(var_name)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, pieces, done)
            if piece is done:
                return
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self._ex.text[-60:]!r})"


def _call_site() -> CallSite:
    """The program's frame: the first one outside loom.lang."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("loom.lang"):
        frame = frame.f_back
    return CallSite(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
