"""Engine: the runtime without HTTP. Starts the scheduler and detokenizer processes and
runs the tokenizer manager on an asyncio loop in a background thread.

A watchdog (watchdog.py) watches both processes once they are ready: when one exits or
makes no progress for `watchdog_timeout` seconds, every call in flight and every later
one fails with EngineDeadError, and `on_failure` callbacks run (`loom serve` exits then).

Every call reaches the manager through `_submit`: once `shutdown` has begun, a new call
raises EngineClosedError at once, and a call in flight fails with it (shutdown cancels
what runs on the loop before stopping it), so no caller waits on a loop that is gone."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.launch import read_ready, spawn_child
from loom.runtime.tokenizer.inputs import GenerateInput, InputLimits
from loom.runtime.tokenizer.manager import TokenizerManager, first_result
from loom.runtime.watchdog import Heartbeat, Watchdog

logger = logging.getLogger(__name__)

_CLOSED = "this Engine has been shut down; create a new one"
_CANCEL_WAIT_S = 5.0  # shutdown waits this long for cancelled calls to unwind


class EngineClosedError(RuntimeError):
    """The Engine was shut down: its processes are gone and it serves no more calls."""


class Engine:
    def __init__(self, model_path: str | None = None, **server_args):
        from transformers import AutoTokenizer

        from loom.runtime.models.model_source import resolve_model_path

        self.args = ServerArgs.from_kwargs(model_path=model_path, **server_args)
        template = _read_template(self.args.chat_template)  # fail before loading a model
        self.model_folder = resolve_model_path(model_path)
        self._children: dict[str, subprocess.Popen] = {}
        self._watchdog = Watchdog(self.args.watchdog_timeout, self._on_child_failure)
        self.failure: str | None = None  # why the Engine serves no more, once a child failed
        self._failure_callbacks: list[Callable[[str], None]] = []
        # Orders _closed against calls being submitted, and against failure reports.
        self._lock = threading.Lock()
        self._closed = False
        self._ipc_dir = tempfile.mkdtemp(prefix="loom-ipc-")
        addr = {k: f"ipc://{self._ipc_dir}/{k}" for k in ("scheduler", "detokenizer", "manager")}
        started = time.monotonic()
        logger.info("loading %s (weights, tokenizer, KV pool)", self.model_folder)
        try:
            self.info = self._launch(addr)
        except BaseException:
            self.shutdown()
            raise
        logger.info("model loaded in %.1f s", time.monotonic() - started)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.args.tokenizer_path or self.model_folder
        )
        if template is not None:  # every use of the tokenizer's template sees the flag's
            self.tokenizer.chat_template = template
        limits = InputLimits(
            self.tokenizer,
            self.info.context_length,
            self.info.max_total_tokens,
            self.info.vocab_size,
            _grammar_check(self.args),
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="loom-tm")
        self._thread.start()
        self.manager: TokenizerManager = self._call(
            self._make_manager(limits, addr["scheduler"], addr["manager"])
        )
        self._watchdog.start()  # the children are ready and the manager can be failed
        atexit.register(self.shutdown)

    def _launch(self, addr: dict) -> m.ServerInfo:
        """Start both children at once (both load for a while); return when both are ready.
        The scheduler is asked first: its start-up errors are the ones that say what to fix."""
        detok = self._spawn(
            "detokenizer",
            dict(
                tokenizer_path=self.args.tokenizer_path or self.model_folder,
                in_addr=addr["detokenizer"],
                out_addr=addr["manager"],
                log_level=self.args.log_level,
                log_format=self.args.log_format,
            ),
        )
        sched = self._spawn(
            "scheduler",
            dict(
                args=self.args,
                model_folder=self.model_folder,
                in_addr=addr["scheduler"],
                out_addr=addr["detokenizer"],
            ),
        )
        with detok, sched:  # the pipes are closed whatever happens
            info = self._ready("scheduler", sched).info
            self._ready("detokenizer", detok)
        return info

    def _spawn(self, role: str, kwargs: dict) -> BinaryIO:
        """Start a child with a heartbeat, under watch; returns its ready pipe."""
        path = os.path.join(self._ipc_dir, f"{role}.heartbeat")
        heartbeat = Heartbeat.create(path, self.args.watchdog_timeout)
        proc, ready = spawn_child(role, {**kwargs, "heartbeat": heartbeat})
        self._children[role] = proc
        self._watchdog.watch(role, proc, heartbeat)
        return ready

    def _ready(self, role: str, pipe: BinaryIO):
        msg = read_ready(pipe)
        if isinstance(msg, m.SchedulerCrashed):
            raise RuntimeError(f"the scheduler failed to start: {msg.message}")
        if msg is None:
            code = self._children[role].wait()
            raise RuntimeError(
                f"the {role} exited during start-up (exit code {code}); see its log above"
            )
        return msg

    async def _make_manager(self, limits, to_scheduler, from_detok) -> TokenizerManager:
        manager = TokenizerManager(self.tokenizer, limits, to_scheduler, from_detok)
        manager.start()
        return manager

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(_CLOSED)

    def _submit(self, coro) -> concurrent.futures.Future:
        """Run `coro` on the loop. Under the lock, so a call submitted before shutdown
        starts is already on the loop when shutdown cancels what runs there."""
        with self._lock:
            if self._closed:
                coro.close()
                raise EngineClosedError(_CLOSED)
            return asyncio.run_coroutine_threadsafe(self._guarded(coro), self._loop)

    async def _guarded(self, awaitable):
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._closed:  # cancelled by shutdown, not by the caller
                raise EngineClosedError(_CLOSED) from None
            raise

    def _call(self, coro):
        try:
            return self._submit(coro).result()
        except concurrent.futures.CancelledError:
            if self._closed:  # cancelled by shutdown before it started
                raise EngineClosedError(_CLOSED) from None
            raise

    async def _await(self, coro):
        return await asyncio.wrap_future(self._submit(coro))

    def _on_loop(self, coro):
        """Run shutdown's own steps on the loop (they bypass the closed check)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_child_failure(self, reason: str) -> None:
        """The watchdog's report, on its thread: fail every call in flight and every later
        one (on the loop), then run the on_failure callbacks. None after shutdown began."""
        with self._lock:
            if self._closed or self.failure is not None:
                return
            self.failure = reason
            callbacks = list(self._failure_callbacks)
        self._loop.call_soon_threadsafe(self.manager.mark_dead, reason)
        for callback in callbacks:
            callback(reason)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once when a child process exits or hangs (at once if one
        has). It runs on the watchdog's thread, so it must not block."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._failure_callbacks.append(callback)
        if failure is not None:
            callback(failure)

    # ---- generate ----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] = -1,
        top_logprobs_num: int | list[int] = 0,
        stream: bool = False,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
    ):
        """A result dict (a list for a batch or n > 1); with stream=True an iterator of
        chunks whose `text` / `output_ids` are deltas."""
        self._check_open()
        obj = GenerateInput(
            prompt,
            input_ids,
            sampling_params,
            rid,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            return_text_in_logprobs,
            stream,
        )
        prepared = self.manager.prepare(obj)  # raise input errors in the caller's thread
        if stream:
            return self._stream(obj, prepared)
        return self._call(first_result(self.manager.generate(obj, prepared)))

    def _stream(self, obj: GenerateInput, prepared) -> Iterator[dict]:
        agen = self.manager.generate(obj, prepared)
        try:
            while True:
                try:
                    yield self._call(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._call(agen.aclose())

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, **kw):
        """Like generate, for asyncio callers; with stream=True an async iterator."""
        self._check_open()
        obj = GenerateInput(prompt, input_ids, sampling_params, **kw)
        prepared = self.manager.prepare(obj)
        if obj.stream:
            return self._astream(obj, prepared)
        return await self._await(first_result(self.manager.generate(obj, prepared)))

    async def _astream(self, obj: GenerateInput, prepared) -> AsyncIterator[dict]:
        agen = self.manager.generate(obj, prepared)
        try:
            while True:
                try:
                    yield await self._await(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                await self._await(agen.aclose())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the tokenizer manager runs on (the HTTP server serves on it too)."""
        self._check_open()
        return self._loop

    @property
    def process_ids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self._children.items()}

    def get_server_info(self) -> m.ServerInfo:
        return self._call(self.manager.server_info())

    def flush_cache(self) -> m.FlushCacheResult:
        return self._call(self.manager.flush_cache())

    # ---- lifetime ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the processes; every later call raises EngineClosedError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._watchdog.stop()  # the children are about to exit on purpose
        loop = getattr(self, "_loop", None)
        if loop is not None:
            self._on_loop(_end_calls())  # callers in flight fail now, not after the wait
        manager = getattr(self, "manager", None)
        alive = manager is not None and manager.dead is None and self.failure is None
        if alive:
            try:
                manager.send_shutdown()
            except Exception:  # noqa: BLE001 - best effort; processes are killed below
                alive = False
        for proc in self._children.values():
            try:
                proc.wait(timeout=10 if alive else 0.1)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()
        if manager is not None:
            self._on_loop(manager.close())
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


async def _end_calls() -> None:
    """Cancel every task on the loop but this one and let them unwind (a request's
    cleanup sends its abort; a call cancelled so raises EngineClosedError, see `_guarded`),
    then close the streams left open, here on the loop, not later wherever they are
    garbage-collected."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_CANCEL_WAIT_S)
    await asyncio.get_running_loop().shutdown_asyncgens()


async def _anext(agen):
    """The next item of a manager generator, started on the loop so the loop owns its
    cleanup (an async generator is finalized by the loop of the thread that first
    iterated it)."""
    return await agen.__anext__()


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the --chat-template file {path!r}: {e.strerror}") from e


def _grammar_check(args: ServerArgs):
    """The configured grammar backend's up-front check, run before a request is queued."""
    from loom.constrain.factory import constraint_validator

    return constraint_validator(args.grammar_backend)
