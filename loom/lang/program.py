"""`@loom.function`: a Python function over a program state, run on a backend."""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from loom.lang.backend_context import resolve_backend, roles_for
from loom.lang.chat_template import RoleTemplate
from loom.lang.errors import LoomError
from loom.lang.executor import Executor, RunContext
from loom.lang.graph import RequestGraph
from loom.lang.interpreter import execute
from loom.lang.ir import SAMPLING_KEYS, Expr
from loom.lang.state import ProgramState, StateBase
from loom.lang.tracer import trace_function

# Run-level options besides the per-gen sampling parameters (SGLang's names).
_RUN_OPTIONS = SAMPLING_KEYS | {"return_logprob", "top_logprobs_num", "split_literals"}
_ALIASES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
Call = tuple[tuple, dict]


class Program:
    def __init__(self, func: Callable, bound: dict[str, Any] | None = None):
        params = list(inspect.signature(func).parameters)
        if not params:
            raise LoomError(
                f"{func.__qualname__}: a program takes its state first: def prog(s, ...)"
            )
        self.func = func
        self.bound = dict(bound or {})
        self.name = func.__qualname__
        self.signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """On a state (`other(s, ...)` inside a program) the body runs on that state;
        otherwise the same as `run`."""
        if args and isinstance(args[0], StateBase):
            return self.func(args[0], *args[1:], **{**self.bound, **kwargs})
        return self.run(*args, **kwargs)

    def bind(self, **kwargs: Any) -> Program:
        """The program with some arguments fixed."""
        self._bind((), {**self.bound, **kwargs}, partial=True)
        return Program(self.func, {**self.bound, **kwargs})

    # ---- running ---------------------------------------------------------------------------

    def run(
        self,
        *args: Any,
        backend: Any = None,
        stream: bool = False,
        chat_template: str | RoleTemplate | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program; returns its state. Keyword arguments that are not the program's
        and are sampling parameters (max_new_tokens, temperature, stop, ...) are defaults for
        its gens. With stream=True the program runs in the background: read it with
        `text_iter()`; errors then surface from the readers and `error()`."""
        defaults, kwargs = self._split(kwargs)
        call = self._bind(args, kwargs)
        state = ProgramState(
            Executor(self._context(backend, defaults, chat_template), streaming=stream)
        )
        if not stream:
            self._execute(state, call, reraise=True)
            return state
        thread = threading.Thread(
            target=self._execute, args=(state, call, False), daemon=True, name="loom-program"
        )
        state._ex.owner = thread
        thread.start()
        return state

    def run_batch(
        self,
        batch_kwargs: Iterable[Any],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        chat_template: str | RoleTemplate | None = None,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run once per item (a dict of keyword arguments, or a tuple of positional ones);
        returns the states in input order. A failed program does not stop the others: its
        state's `error()` holds the exception. The constant prefix the programs share is
        sent to the backend once first, so every program finds it cached."""
        items = list(batch_kwargs)
        threads = _thread_count(num_threads, len(items))
        defaults, extra = self._split(sampling)
        if extra:
            raise LoomError(f"run_batch got unknown options {sorted(extra)}")
        calls = [self._batch_call(item, i) for i, item in enumerate(items)]
        ctx = self._context(backend, defaults, chat_template)
        if len(calls) > 1 and ctx.backend.capabilities.cache:
            self._warm(ctx, calls)
        states = [ProgramState(Executor(ctx)) for _ in calls]

        def run_one(i: int) -> None:
            states[i]._ex.owner = threading.current_thread()
            self._execute(states[i], calls[i], reraise=False)

        if calls:
            with ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(run_one, i) for i in range(len(calls))]
                for future in _progress(as_completed(futures), len(calls), progress_bar, self.name):
                    future.result()
        return states

    def _execute(self, state: ProgramState, call: Call, reraise: bool) -> None:
        args, kwargs = call
        try:
            self.func(state, *args, **kwargs)
        except BaseException as e:
            state._ex.fail(e)
            if reraise:
                raise
        finally:
            state._ex.close()

    # ---- tracing ---------------------------------------------------------------------------

    def trace(self, **kwargs: Any) -> RequestGraph:
        """The request graph, with the given arguments concrete and the others symbolic."""
        return trace_function(self.func, self.name, kwargs, self.bound)

    def cache(self, backend: Any = None, chat_template: str | RoleTemplate | None = None) -> str:
        """Send the program's constant prefix to the backend's cache; returns that prefix."""
        ctx = self._context(backend, {}, chat_template)
        return self._warm(ctx, [])

    def _warm(self, ctx: RunContext, calls: list[Call]) -> str:
        graph = trace_function(self.func, self.name, self._common_arguments(calls), self.bound)
        prefix = render_constant(ctx, graph.constant_prefix())
        if prefix.strip():
            ctx.backend.cache_prefix(prefix)
        return prefix

    def _common_arguments(self, calls: list[Call]) -> dict[str, Any]:
        """Arguments with the same value in every call: concrete in the warm-up trace."""
        if not calls:
            return {}
        bound = [self.signature.bind(None, *a, **k).arguments for a, k in calls]
        common = {}
        for name, value in bound[0].items():
            if name == next(iter(self.signature.parameters)):
                continue
            if all(name in b and _same(b[name], value) for b in bound[1:]):
                common[name] = value
        return common

    # ---- arguments ---------------------------------------------------------------------------

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict, dict]:
        """(sampling defaults, program arguments): the program's own parameters win."""
        own = set(self.signature.parameters)
        defaults, rest = {}, {}
        for key, value in kwargs.items():
            name = _ALIASES.get(key, key)
            if name in _RUN_OPTIONS and key not in own:
                if value is not None:
                    defaults[name] = list(value) if isinstance(value, tuple) else value
            else:
                rest[key] = value
        if isinstance(defaults.get("stop"), str):
            defaults["stop"] = [defaults["stop"]]
        return defaults, rest

    def _bind(self, args: tuple, kwargs: dict, partial: bool = False) -> Call:
        merged = {**self.bound, **kwargs}
        try:
            binder = self.signature.bind_partial if partial else self.signature.bind
            binder(None, *args, **merged)
        except TypeError as e:
            raise LoomError(f"{self.name}: {e}") from None
        return args, merged

    def _batch_call(self, item: Any, index: int) -> Call:
        if isinstance(item, dict):
            args, kwargs = (), item
        elif isinstance(item, (tuple, list)):
            args, kwargs = tuple(item), {}
        else:
            raise LoomError(
                f"run_batch item {index} must be a dict of keyword arguments or a tuple of "
                f"positional ones, got {type(item).__name__}"
            )
        try:
            return self._bind(args, kwargs)
        except LoomError as e:
            raise LoomError(f"run_batch item {index}: {e}") from None

    def _context(self, backend: Any, defaults: dict, template: Any) -> RunContext:
        resolved = resolve_backend(backend)
        return RunContext(resolved, roles_for(resolved, template), defaults, self.name, run=execute)

    def __repr__(self) -> str:
        return f"<loom program {self.name}>"


def function(func: Callable | None = None, *, num_api_spec_tokens: int | None = None) -> Any:
    """`@loom.function` (or `@loom.function()`): make `def prog(s, ...)` a program.
    `num_api_spec_tokens` is accepted for SGLang programs and has no effect."""
    if func is None:
        return lambda f: Program(f)
    return Program(func)


def render_constant(ctx: RunContext, exprs: list[Expr]) -> str:
    """The text constant expressions (text, role markers) write; no backend call."""
    ex = Executor(ctx)
    for e in exprs:
        ex.submit(e)
    return ex.text


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values without a usable ==
        return False


def _thread_count(num_threads: int | str, n: int) -> int:
    if num_threads == "auto":
        return max(1, min(n, max(64, 16 * (os.cpu_count() or 1))))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise LoomError(f"num_threads must be 'auto' or a positive int, got {num_threads!r}")
    return min(num_threads, n)


def _progress(futures: Iterable, total: int, enabled: bool, name: str) -> Iterable:
    if not enabled:
        return futures
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety
        return futures
    return tqdm(futures, total=total, desc=name)
