"""Every HTTP request's id, and its one log line when it ends.

A request is known by one id everywhere: in the server's log lines, to the scheduler (its
lines name it), in POST /abort_request and in the `X-Request-Id` response header. The id
is the body's `rid` when it gives one, else the `X-Request-Id` header the client (or a
proxy) sent, else a fresh one (Frontend.prepare hands it to the engine).

The line, at info for requests that generated and for errors (debug for health checks,
scrapes and other quick reads):

    POST /v1/chat/completions 200 in 0.412s: 1 completion, 24 prompt (16 cached) + 9
    completion tokens, finish stop
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.runtime.http.errors import APIError
from loom.runtime.http.metrics import ServerMetrics
from loom.runtime.logs import bind_request, unbind_request

logger = logging.getLogger("loom.request")

ID_HEADER = b"x-request-id"
MAX_ID_CHARS = 256


@dataclass(eq=False)
class RequestRecord:
    """One HTTP request as its log line tells it: what its completions amounted to."""

    rid: str
    completions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def add(self, meta: dict) -> None:
        """A finished completion's meta_info."""
        self.completions += 1
        self.prompt_tokens += meta.get("prompt_tokens", 0)
        self.cached_tokens += meta.get("cached_tokens", 0)
        self.completion_tokens += meta.get("completion_tokens", 0)
        reason = (meta.get("finish_reason") or {}).get("type", "unknown")
        if reason not in self.finish_reasons:
            self.finish_reasons.append(reason)

    def summary(self) -> str:
        plural = "" if self.completions == 1 else "s"
        return (
            f"{self.completions} completion{plural}, {self.prompt_tokens} prompt "
            f"({self.cached_tokens} cached) + {self.completion_tokens} completion tokens, "
            f"finish {'/'.join(self.finish_reasons)}"
        )


class RequestIds:
    """ASGI middleware, outermost: ids, the X-Request-Id header, the line, error counts."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(ID_HEADER)
        problem = _id_problem(given)
        record = RequestRecord(given.decode() if given and not problem else uuid.uuid4().hex)
        status = 500  # what the client gets if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != ID_HEADER]
                headers.append((ID_HEADER, record.rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = bind_request(record)
        try:
            if problem is None:
                await self.app(scope, receive, send_with_id)
            else:
                await APIError(400, problem).response()(scope, receive, send_with_id)
        finally:
            self._finished(scope, record, status, time.perf_counter() - started)
            unbind_request(token)

    def _finished(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        if status >= 400:
            self.metrics.http_error(status)
        line = f"{scope['method']} {scope['path']} {status} in {seconds:.3f}s"
        if record.completions:
            line += ": " + record.summary()
        level = logging.INFO if record.completions or status >= 400 else logging.DEBUG
        logger.log(logging.WARNING if status >= 500 else level, "%s", line)


def _id_problem(given: bytes | None) -> str | None:
    """Why an X-Request-Id header cannot name a request, or None."""
    if given is None:
        return None
    if 0 < len(given) <= MAX_ID_CHARS and all(0x21 <= b <= 0x7E for b in given):
        return None
    return (
        f"the X-Request-Id header must be 1 to {MAX_ID_CHARS} visible ASCII characters "
        "(no spaces); send another id or none (the server then makes one)"
    )
