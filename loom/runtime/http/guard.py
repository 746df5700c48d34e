"""What every HTTP request passes before a handler sees it: the API key (401) and the
body-size limit (413), as ASGI middleware around the whole app, so no route can forget them.

The key follows SGLang and vLLM: `Authorization: Bearer <key>` on every route but the
health checks and /metrics (what load balancers and Prometheus scrape without secrets).
Checked before the body is read, so a caller without the key costs the server nothing.

The body limit holds whether the client declares a length or streams chunks: a declared
Content-Length over it is answered at once, unread; a chunked body is counted as it
arrives and refused the moment it passes the limit. uvicorn discards the unread rest, so
the client still reads the 413 after it finishes sending.
"""

from __future__ import annotations

import hmac
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.runtime.args import API_KEY_ENV
from loom.runtime.http.errors import APIError

OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


def configured_api_key(flag: str | None) -> str | None:
    """--api-key, else $LOOM_API_KEY; None (or empty): the server is open."""
    return flag or os.environ.get(API_KEY_ENV) or None


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # uvicorn gives lower-case names
        try:
            self._check_key(scope["path"], headers.get(b"authorization"))
            self._check_length(headers.get(b"content-length"))
        except APIError as e:
            await _response(e)(scope, receive, send)
            return
        await self.app(scope, self._counted(receive), send)

    def _check_key(self, path: str, authorization: bytes | None) -> None:
        if self.api_key is None or path in OPEN_PATHS:
            return
        scheme, _, given = (authorization or b"").partition(b" ")
        if not authorization or scheme.lower() != b"bearer":
            raise APIError(
                401,
                "this server needs an API key: send `Authorization: Bearer <key>` "
                "(the openai client does, from its api_key)",
                code="invalid_api_key",
            )
        # Constant time: how long a wrong key takes to refuse says nothing of the right one.
        if not hmac.compare_digest(given.strip(), self.api_key):
            raise APIError(401, "the API key is wrong", code="invalid_api_key")

    def _check_length(self, declared: bytes | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes, f"{int(declared)} bytes were declared")

    def _counted(self, receive: Receive) -> Receive:
        """`receive`, refusing the body once its bytes pass the limit: a chunked body
        declares no length to check up front."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes, f"at least {seen} bytes were sent")
            return message

        return counted


def _too_large(limit: int, what: str) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server takes ({limit} bytes; {what}); "
        "send less, or start the server with a larger --max-request-body-bytes",
        code="request_too_large",
    )


def _response(error: APIError):
    response = error.response()
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
    return response
