"""The executor of one program state: owns its text, variables and messages, and runs its
expressions in submission order.

A program's own state runs expressions inline, in the program's thread: a gen returns
when its text is there, and an error raises at the program's own line. Fork branches run
on a thread each (started on demand, gone when idle), so sibling branches reach the
backend together and their requests are batched. Readers (`s["x"]`, `text_iter`) may be on
other threads: they wait on `cond` and never hang on a failed state.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loom.backends.base import ProgramBackend
from loom.lang.chat_template import RoleTemplate
from loom.lang.errors import CallSite, LoomError, ProgramError
from loom.lang.ir import Expr, describe


@dataclass(frozen=True)
class RunContext:
    backend: ProgramBackend
    roles: RoleTemplate
    defaults: dict = field(default_factory=dict)  # the run's sampling parameters
    program: str = "program"
    # What an expression does to a state (interpreter.execute): handed in by whoever
    # starts a run, so this module, which the interpreter builds on, never imports it.
    run: Callable[[Executor, Expr], None] = field(kw_only=True)


class Executor:
    def __init__(self, ctx: RunContext, *, threaded: bool = False, streaming: bool = False):
        self.ctx = ctx
        self.threaded = threaded
        self.text = ""
        self.variables: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.messages: list[dict] = []
        self.role: str | None = None
        self.role_start = 0
        self.scopes: dict[str, int] = {}
        self.seen = 0  # how much of `text` the backend has processed (so has cached)
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.queue: deque[tuple[Expr, CallSite | None]] = deque()
        self.busy = False
        self.closed = False  # the program has returned: nothing more will be submitted
        self.owner = threading.current_thread()  # the thread that runs the program
        self.stream_log: list[tuple[str | None, str]] | None = [] if streaming else None
        self.fork_base = 0
        self.base_vars: dict[str, Any] = {}

    # ---- running expressions ----------------------------------------------------------------

    def submit(self, expr: Expr, site: CallSite | None = None) -> None:
        if not self.threaded:
            self._run(expr)
            return
        with self.cond:
            if self.error is not None:
                raise self.error
            self.queue.append((expr, site))
            if not self.busy:
                self.busy = True
                threading.Thread(target=self._drain, daemon=True, name="loom-branch").start()

    def _drain(self) -> None:
        while True:
            with self.cond:
                if not self.queue:
                    self.busy = False
                    self.cond.notify_all()
                    return
                expr, site = self.queue.popleft()
            try:
                self._run(expr)
            except BaseException as e:  # noqa: BLE001 - recorded; readers re-raise it
                self._fail_async(expr, site, e)
                return

    def _run(self, expr: Expr) -> None:
        self.ctx.run(self, expr)

    def _fail_async(self, expr: Expr, site: CallSite | None, error: BaseException) -> None:
        where = f" (submitted at {site})" if site else ""
        wrapped = ProgramError(f"{self.ctx.program}: {describe(expr)} failed{where}: {error}")
        wrapped.__cause__ = error
        with self.cond:
            self.error = wrapped
            self.queue.clear()
            self.busy = False
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The program itself raised: record it for readers on other threads."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # ---- state changes (from the executing thread) -----------------------------------------

    def append(self, text: str, var: str | None = None) -> None:
        if not text:
            return
        self.text += text
        if self.stream_log is not None:
            with self.cond:
                self.stream_log.append((var, text))
                self.cond.notify_all()

    def set_var(self, name: str, value: Any, meta: dict | None = None) -> None:
        with self.cond:
            self.variables[name] = value
            if meta is not None:
                self.meta[name] = meta
            self.cond.notify_all()

    # ---- readers (any thread) ---------------------------------------------------------------

    def _pending(self) -> bool:
        """Whether the state may still change, as seen from the calling thread."""
        if self.busy or self.queue:
            return True
        return not self.closed and threading.current_thread() is not self.owner

    def wait_var(self, name: str) -> Any:
        with self.cond:
            while name not in self.variables:
                if self.error is not None:
                    raise self.error
                if not self._pending():
                    known = sorted(self.variables)
                    raise LoomError(f"no variable {name!r} in this state; variables: {known}")
                self.cond.wait()
            return self.variables[name]

    def sync(self, raise_error: bool = True) -> None:
        """Wait until every submitted expression ran (and, from another thread, until the
        program returned)."""
        with self.cond:
            while self._pending() and self.error is None:
                self.cond.wait()
            if raise_error and self.error is not None:
                raise self.error

    def iter_text(self, var: str | None = None) -> Iterator[str]:
        """Pieces of text as they are appended (only those of variable `var` if given)."""
        if self.stream_log is None:
            self.sync()
            yield self.text if var is None else str(self.variables.get(var, ""))
            return
        seen = 0
        while True:
            with self.cond:
                while seen >= len(self.stream_log) and self._pending() and self.error is None:
                    self.cond.wait()
                items = self.stream_log[seen:]
                seen += len(items)
                done = not self._pending() or self.error is not None
                error = self.error
            for name, piece in items:
                if var is None or name == var:
                    yield piece
            if done and seen >= len(self.stream_log):
                if error is not None:
                    raise error
                return

    # ---- forks -------------------------------------------------------------------------------

    def branch(self) -> Executor:
        """A copy of this state that runs on its own thread."""
        child = Executor(self.ctx, threaded=True)
        child.closed = True  # readers wait only for the expressions queued on it
        child.text, child.seen = self.text, self.seen
        child.variables, child.meta = dict(self.variables), dict(self.meta)
        child.messages = [dict(m) for m in self.messages]
        child.role, child.role_start, child.scopes = self.role, self.role_start, dict(self.scopes)
        child.fork_base, child.base_vars = len(self.text), dict(self.variables)
        return child

    def new_variables(self) -> list[str]:
        """Names this branch set or changed since it was forked."""
        return [
            k
            for k, v in self.variables.items()
            if k not in self.base_vars or self.base_vars[k] is not v
        ]
