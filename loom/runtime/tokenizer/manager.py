"""The tokenizer manager (asyncio, main process): validated requests out to the scheduler,
text results back from the detokenizer, routed to the caller that waits for them."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

from loom.runtime import messages as m
from loom.runtime.sampling.params import InvalidRequestError
from loom.runtime.tokenizer.inputs import GenerateInput, InputLimits, Item, expand
from loom.runtime.tokenizer.results import RequestState

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """A child process (scheduler or detokenizer) exited, crashed or hung: no request can
    be served until the Engine (the server) is restarted."""


class TokenizerManager:
    def __init__(self, tokenizer, limits: InputLimits, to_scheduler: str, from_detokenizer: str):
        import zmq
        import zmq.asyncio

        self.tokenizer = tokenizer
        self.limits = limits
        self.ctx = zmq.asyncio.Context(1)
        self.sender = self.ctx.socket(zmq.PUSH)
        self.sender.connect(to_scheduler)
        self.receiver = self.ctx.socket(zmq.PULL)
        self.receiver.bind(from_detokenizer)
        self.states: dict[str, tuple[RequestState, asyncio.Queue]] = {}
        self.replies: dict[type, collections.deque] = collections.defaultdict(collections.deque)
        self.dead: str | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.ctx.destroy(linger=0)

    def mark_dead(self, reason: str) -> None:
        """A child process is gone or hung (a crash report, or the Engine's watchdog): fail
        everything in flight and every later request. The first reason is the one kept."""
        if self.dead is None:
            self.dead = reason
            logger.error("%s", reason)
        for state, queue in list(self.states.values()):
            queue.put_nowait((state, EngineDeadError(reason)))
        for waiters in self.replies.values():
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():  # its caller may have gone (cancelled)
                    waiter.set_exception(EngineDeadError(reason))

    async def _receive_loop(self) -> None:
        while True:
            msg = await self.receiver.recv_pyobj()
            if isinstance(msg, m.BatchOutput):
                for out in msg.outputs:
                    entry = self.states.get(out.rid)
                    if entry is not None:
                        entry[1].put_nowait((entry[0], out))
            elif isinstance(msg, m.SchedulerCrashed):
                self.mark_dead(msg.message)
            elif self.replies[type(msg)]:
                self.replies[type(msg)].popleft().set_result(msg)

    # ---- generate ----------------------------------------------------------------------

    def prepare(self, obj: GenerateInput) -> tuple[list[Item], bool]:
        """Validate (raises InvalidRequestError) without sending anything."""
        self.check_alive()
        items, is_batch = expand(obj, self.limits)
        self.check_new(items)
        return items, is_batch

    def check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def check_new(self, items: list[Item]) -> None:
        """Raises unless expanded items may be sent now: the scheduler lives and none of
        their ids is in flight."""
        self.check_alive()
        for item in items:
            if item.request.rid in self.states:
                raise InvalidRequestError(f"request id {item.request.rid!r} is already in flight")

    async def generate(
        self, obj: GenerateInput, prepared: tuple[list[Item], bool] | None = None
    ) -> AsyncIterator:
        """Stream: yields chunks (with "index" for batches). Otherwise yields once: the
        result dict, or the list of them for a batch / n > 1. `prepared`: what prepare(obj)
        returned, when the caller validated first (so the prompt is tokenized once)."""
        items, is_batch = prepared if prepared is not None else self.prepare(obj)
        queue: asyncio.Queue = asyncio.Queue()
        states = [RequestState(item, self.tokenizer) for item in items]
        for state in states:
            self.states[state.item.request.rid] = (state, queue)
            self.sender.send_pyobj(state.item.request)
        unfinished = len(states)
        try:
            while unfinished:
                state, out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                chunk = state.absorb(out)
                if state.finished:
                    unfinished -= 1
                    self.states.pop(state.item.request.rid, None)
                if obj.stream:
                    if is_batch:
                        chunk["index"] = state.item.index
                    yield chunk
            if not obj.stream:
                results = [s.result() for s in states]
                yield results if is_batch else results[0]
        finally:
            # The caller went away (disconnect, cancel, error): abort what is still running.
            for state in states:
                rid = state.item.request.rid
                if rid in self.states and not state.finished:
                    self.states.pop(rid, None)
                    self.abort(rid)

    def abort(self, rid: str) -> None:
        if self.dead is None:
            self.sender.send_pyobj(m.AbortRequest(rid))

    async def _ask(self, request, reply_type: type):
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        future = asyncio.get_running_loop().create_future()
        self.replies[reply_type].append(future)
        self.sender.send_pyobj(request)
        return await future

    async def server_info(self) -> m.ServerInfo:
        return await self._ask(m.ServerInfoRequest(), m.ServerInfo)

    async def flush_cache(self) -> m.FlushCacheResult:
        return await self._ask(m.FlushCacheRequest(), m.FlushCacheResult)

    def send_shutdown(self) -> None:
        self.sender.send_pyobj(m.ShutdownRequest())


async def first_result(agen: AsyncIterator[T]) -> T:
    """The one item of a non-stream generate (TokenizerManager.generate, or a wrapper of
    it); the generator is closed either way, which aborts whatever is still running."""
    try:
        async for item in agen:
            return item
    finally:
        await agen.aclose()
    raise RuntimeError("the request produced no result")
