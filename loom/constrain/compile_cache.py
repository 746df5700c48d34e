"""Grammar compiles off the caller's thread, cached by key, with a time limit.

Shared by the grammar backends: each gives a `compile(kind, text)` function; the cache
runs it in a thread pool and hands out one future per (kind, text).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

from loom.constrain.base import GrammarError


class CompileCache:
    """A bounded LRU of compile futures keyed by (kind, text).

    Invariants: one compile per key at a time (concurrent callers share its future); a
    caller's future fails with GrammarError after `timeout` seconds even while the worker
    thread is still compiling, and that key then fails fast until evicted. A compile that
    raises anything else fails its future with GrammarError(describe(kind, text, error)).
    """

    def __init__(
        self,
        compile: Callable[[str, str], Any],
        describe: Callable[[str, str, BaseException], str],
        *,
        num_threads: int,
        timeout: float,
        size: int,
        thread_name: str,
    ):
        self._compile = compile
        self._describe = describe
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix=thread_name)
        self.timeout = timeout
        self._size = size
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._timers: set[threading.Timer] = set()

    def get(self, kind: str, text: str) -> Future:
        """The shared compile future of (kind, text); a cache hit returns the same one."""
        key = (kind, text)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = Future()
            self._cache[key] = future
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._start_timer(future)
        self._pool.submit(self._compile_into, future, kind, text)
        return future

    def _compile_into(self, future: Future, kind: str, text: str) -> None:
        try:
            compiled = self._compile(kind, text)
        except GrammarError as e:
            settle(future, error=e)
        except Exception as e:  # the libraries raise RuntimeError / ValueError subclasses
            settle(future, error=GrammarError(self._describe(kind, text, e)))
        else:
            settle(future, result=compiled)

    def _start_timer(self, future: Future) -> None:
        message = f"grammar compile took longer than {self.timeout:g}s"
        timer = threading.Timer(self.timeout, settle, (future,), {"error": GrammarError(message)})
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)

        def forget(_: Future) -> None:
            timer.cancel()
            with self._lock:
                self._timers.discard(timer)

        future.add_done_callback(forget)
        timer.start()

    def shutdown(self) -> None:
        with self._lock:
            timers, self._timers = list(self._timers), set()
        for timer in timers:
            timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def then(future: Future, make: Callable[[Any], Any], wrap_error: Callable[[Exception], str]):
    """A future of make(future's result); make's exception fails it with GrammarError
    (wrap_error's message), and future's own error passes through."""
    result: Future = Future()

    def done(source: Future) -> None:
        error = source.exception()
        if error is not None:
            settle(result, error=error)
            return
        try:
            value = make(source.result())
        except Exception as e:  # one request's matcher that cannot start fails it alone
            settle(result, error=GrammarError(wrap_error(e)))
        else:
            settle(result, result=value)

    future.add_done_callback(done)
    return result


def settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Complete `future` unless it already is (the compile and its timer race; a caller
    may have cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # the other side got there first
        pass
