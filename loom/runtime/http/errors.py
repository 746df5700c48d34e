"""HTTP errors in OpenAI's error-object shape, for the native and the OpenAI-compatible API:
`{"error": {"message", "type", "param", "code"}}` with the status code that says who must act
(4xx: the caller; 503: retry later or restart the server; 500: a loom bug)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from loom.runtime.sampling.params import InvalidRequestError
from loom.runtime.tokenizer.manager import EngineDeadError

logger = logging.getLogger(__name__)

# The status nginx made up for "the client closed the connection": nobody reads it.
CLIENT_CLOSED = 499


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        message = _encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else _encodable(param)
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _encodable(text: str) -> str:
    """A message may quote the request: a lone surrogate in it would fail to encode the
    response (a 500 instead of this error), so it is written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode()


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its request was aborted."""


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the server cannot generate: {exc}", code="engine_dead")
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, RecursionError):  # a body (or a schema in it) nested thousands deep
        return APIError(400, "the request nests too deeply (JSON arrays / objects); flatten it")
    logger.exception("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}")


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """pydantic's list of problems -> one message naming the fields to fix."""
    problems = exc.errors()
    parts = []
    for p in problems[:3]:
        where = ".".join(str(x) for x in p["loc"] if x != "body")
        parts.append(f"`{where}`: {p['msg']}" if where else p["msg"])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    param = ".".join(str(x) for x in problems[0]["loc"]) if problems else None
    return APIError(400, "invalid request: " + "; ".join(parts) + more, param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(exc, HTTPException):
            return _http_error(request, exc).response()
        if isinstance(exc, RequestValidationError):
            return validation_error(exc).response()
        return as_api_error(exc).response()

    for kind in (
        APIError,
        ClientDisconnected,
        InvalidRequestError,
        EngineDeadError,
        ValidationError,
        RequestValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, api_error)


def _http_error(request: Request, exc: HTTPException) -> APIError:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return APIError(404, f"{where}: no such endpoint (see /docs for the API)")
    if exc.status_code == 405:
        return APIError(405, f"{where}: this endpoint does not take {request.method}")
    return APIError(exc.status_code, f"{where}: {exc.detail}")
