"""What every HTTP endpoint shares on its way to the tokenizer manager: validation errors
as 4xx, the queue cap (503), aborting a request the moment its client disconnects or by
its id, turning scheduler-side aborts into errors, metrics, and server-sent events.

This runs on the tokenizer manager's event loop: uvicorn serves on the Engine's loop, so a
handler awaits the manager directly, with no thread hop per token. The one exception is a
request's preparation (tokenizing, chat templates, schema checks), whose cost grows with
its input: it runs on worker threads (`off_loop`), so a 20 MB prompt does not hold up
/health or the tokens streamed to other clients.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from loom.runtime.http.errors import APIError, ClientDisconnected, as_api_error
from loom.runtime.http.metrics import ServerMetrics
from loom.runtime.http.request_log import RequestRecord
from loom.runtime.logs import current_request
from loom.runtime.messages import ServerInfo
from loom.runtime.tokenizer.inputs import GenerateInput, Item, expand
from loom.runtime.tokenizer.manager import TokenizerManager, first_result

T = TypeVar("T")

# Workers preparing requests. The tokenizer releases the GIL while it encodes, so several
# prompts are tokenized at once on as many cores; more would only queue on the cores.
PREPARE_THREADS = 4


@dataclass(eq=False)
class Prepared:
    """A validated request: its per-completion items, ready to send to the scheduler. It
    holds its place in the server's count of requests in flight until release()."""

    obj: GenerateInput
    items: list[Item]
    is_batch: bool
    release: Callable[[], None]


class InFlightNames:
    """The completions in flight under each id they answer to (Item.names): what
    POST /abort_request reaches. Exact ids only, so one client's `job` never reaches
    another's `job-7`. An id belongs to one request at a time."""

    def __init__(self) -> None:
        self._rids: dict[str, set[str]] = {}

    def taken(self, items: list[Item]) -> str | None:
        """The first id of `items` that a request in flight already answers to."""
        return next((n for item in items for n in item.names if n in self._rids), None)

    def add(self, items: list[Item]) -> None:
        for item in items:
            for name in item.names:
                self._rids.setdefault(name, set()).add(item.request.rid)

    def remove(self, items: list[Item]) -> None:
        for item in items:
            for name in item.names:
                rids = self._rids.get(name, set())
                rids.discard(item.request.rid)
                if not rids:
                    self._rids.pop(name, None)

    def rids(self, name: str) -> list[str]:
        return sorted(self._rids.get(name, ()))

    def __contains__(self, name: str) -> bool:
        return name in self._rids


class Frontend:
    def __init__(
        self,
        manager: TokenizerManager,
        max_running: int,
        max_queued: int | None,
        model_name: str,
    ):
        self.manager = manager
        self.metrics = ServerMetrics(model_name)
        # Completions admitted and not yet finished. Beyond what the scheduler runs at once,
        # they wait in its queue: the cap bounds that queue.
        self.in_flight = 0
        self.capacity = None if max_queued is None else max_running + max_queued
        self.max_queued = max_queued
        self.names = InFlightNames()
        self.client_aborted: set[str] = set()  # rids stopped through POST /abort_request
        self.preparing = 0  # requests on the workers now
        self.workers = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="loom-prepare")
        # Workers share the tokenizer: concurrent encodes only read it, unless a call must
        # first clear a truncation or padding its file set. One call here clears them;
        # nothing later sets them (chat_template_kwargs may not: openai_api).
        manager.tokenizer("")

    @property
    def dead(self) -> str | None:
        return self.manager.dead

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on a worker thread: for work that grows with a request's input."""
        self.preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)
        finally:
            self.preparing -= 1

    async def prepare(self, obj: GenerateInput, admit: bool = True) -> Prepared:
        """Validate and tokenize (off the loop); raises APIError (400 bad input, 503 dead or
        full). admit=False: not held to the queue cap (health checks)."""
        self._name(obj)
        try:
            self.manager.check_alive()  # before the work, not only after it
            items, is_batch = await self.off_loop(expand, obj, self.manager.limits)
            self.manager.check_new(items)
        except Exception as e:  # noqa: BLE001 - mapped to the right status
            raise as_api_error(e) from e
        taken = self.names.taken(items)
        if taken is not None:
            raise APIError(400, f"request id {taken!r} is already in flight", param="rid")
        if admit and self.capacity is not None and self.in_flight + len(items) > self.capacity:
            raise APIError(
                503,
                f"the server is at capacity ({self.in_flight} requests in flight, at most "
                f"{self.max_queued} may wait beyond those running); retry later",
                code="queue_full",
            )
        # Counted from admission on, so requests arriving together cannot all slip under
        # the cap; released when the request ends, or, if its response never starts (the
        # client left first), when the Prepared is dropped. The count and the names are
        # the loop's: a Prepared collected on a worker thread is released on the loop.
        self.in_flight += len(items)
        self.names.add(items)
        prepared = Prepared(obj, items, is_batch, self._releaser(items))
        weakref.finalize(prepared, _call_on, asyncio.get_running_loop(), prepared.release)
        return prepared

    def _name(self, obj: GenerateInput) -> None:
        """One id for the request in the log, the scheduler and /abort_request: the body's
        rid, else the HTTP request's (its X-Request-Id header or a fresh one, request_log);
        a header id already in flight (a client's retry) gets a suffix."""
        record = current_request()
        if not isinstance(record, RequestRecord):  # not served over HTTP
            return
        if isinstance(obj.rid, str):
            record.rid = obj.rid
        elif obj.rid is None:
            if record.rid in self.names:
                record.rid = f"{record.rid}-{uuid.uuid4().hex[:8]}"
            obj.rid = record.rid

    def _releaser(self, items: list[Item]) -> Callable[[], None]:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= len(items)
                self.names.remove(items)

        return release

    async def chunks(self, prepared: Prepared) -> AsyncIterator[dict]:
        """The manager's outputs: stream chunks, or for a non-stream request one result (a
        list for a batch or n > 1). Raises APIError for a request the scheduler aborted."""
        agen = self.manager.generate(prepared.obj, (prepared.items, prepared.is_batch))
        finished, failed = 0, False
        try:
            async for out in agen:
                for result in out if isinstance(out, list) else [out]:
                    finished += result["meta_info"].get("finish_reason") is not None
                    self._on_output(result["meta_info"], prepared.obj.stream)
                yield out
        except Exception as e:  # noqa: BLE001 - mapped to the right status
            failed = True
            raise as_api_error(e) from e
        finally:
            if finished < len(prepared.items) and not failed:  # the client left (cancelled)
                self.metrics.abort("client")
            prepared.release()
            for item in prepared.items:
                self.client_aborted.discard(item.request.rid)
            await agen.aclose()  # aborts in the scheduler whatever is still running

    async def result(self, prepared: Prepared, request: Request) -> dict | list[dict]:
        """A non-stream request's answer; aborted at once if the client disconnects."""
        return await until_disconnect(request, first_result(self.chunks(prepared)))

    def _on_output(self, meta: dict, streamed: bool) -> None:
        """Count a completion that finished, for /metrics and the request's log line."""
        reason = meta.get("finish_reason")
        if reason is None:
            return
        by_client = meta["id"] in self.client_aborted
        self.metrics.observe(meta, streamed, by_client)
        record = current_request()
        if isinstance(record, RequestRecord):
            record.add(meta)
        if reason.get("type") == "abort" and not by_client:
            raise APIError(400, reason.get("message") or "the request was aborted")

    def abort(self, rid: str) -> list[str]:
        """Abort the request `rid`: the completions that answer to it (Item.names: its own
        and those loom derived from it for n > 1 and batches); returns the rids hit."""
        hit = [r for r in self.names.rids(rid) if r in self.manager.states]
        for r in hit:
            self.client_aborted.add(r)
            self.manager.abort(r)
        return hit

    async def server_info(self) -> ServerInfo:
        try:
            return await self.manager.server_info()
        except Exception as e:  # noqa: BLE001 - mapped to the right status
            raise as_api_error(e) from e


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(fn)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first: then cancel it (the manager aborts
    the request, which frees its KV) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next ASGI message is http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse_event(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def sse(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Server-sent events: `data: {...}` per event, an error event if the request fails
    midway, and `data: [DONE]`. Starlette cancels this generator when the client
    disconnects; the cancellation reaches the manager, which aborts the request."""
    try:
        async for event in events:
            yield sse_event(event)
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in the stream
        yield sse_event(as_api_error(e).body())
    yield sse_event("[DONE]")
