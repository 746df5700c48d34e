"""RuntimeEndpoint: a running `loom serve`, reached over HTTP with the native API. The
language layer builds on `generate`; results have the Engine's shape.

Requests go through the standard library's http.client on one keep-alive connection per
thread. run_batch sends from hundreds of threads, and a request's client CPU is held under
the GIL: httpx took ~0.7 ms of it per request, http.client ~0.2 ms."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
import weakref
from collections.abc import Iterator
from typing import Any

from loom.runtime.args import API_KEY_ENV
from loom.runtime.sampling.params import InvalidRequestError

HEALTH_TIMEOUT = 5.0
JSON_HEADERS = {"Content-Type": "application/json"}

# How a reused keep-alive connection fails when the server closed it while idle: before any
# response, so the server never saw the request and it is safe to send it again.
STALE_CONNECTION_ERRORS = (
    ConnectionResetError,  # http.client.RemoteDisconnected among them
    BrokenPipeError,
    ConnectionAbortedError,
    http.client.CannotSendRequest,
    http.client.BadStatusLine,
)


class RuntimeEndpointError(RuntimeError):
    """The server answered with an error (other than a bad request)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle costs ~26 ms."""
    return ssl.create_default_context()


class _HTTPConnection(http.client.HTTPConnection):
    """http.client sets TCP_NODELAY itself on connect, so a request is not held back by
    Nagle's algorithm waiting for the ack of the previous one."""

    def __del__(self) -> None:
        self.close()  # its thread ended: close the socket rather than leave it to the GC


class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
    pass


class RuntimeEndpoint:
    def __init__(self, url: str, timeout: float | None = None, api_key: str | None = None):
        """`api_key`: sent as `Authorization: Bearer <key>` on every request, for a server
        started with --api-key; None reads $LOOM_API_KEY (unset: no key is sent)."""
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path
        self._timeout = timeout
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[_HTTPConnection] = weakref.WeakSet()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        **kw,
    ) -> dict | list[dict] | Iterator[dict]:
        """Like Engine.generate: a result dict (a list for a batch or n > 1), or with
        stream=True an iterator of chunks whose text / output_ids are deltas."""
        body = {"sampling_params": sampling_params, "stream": stream, **kw}
        if prompt is not None:
            body["text"] = prompt
        if input_ids is not None:
            body["input_ids"] = input_ids
        body = {k: v for k, v in body.items() if v is not None}
        if stream:
            return self._stream(body)
        return self._call("POST", "/generate", body)

    def _stream(self, body: dict) -> Iterator[dict]:
        conn, response = self._send("POST", "/generate", body)
        try:
            if response.status >= 400:
                _raise_for_error(response.status, response.read())
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :].rstrip(b"\r\n")
                if data == b"[DONE]":
                    response.read()  # the end of the chunked body: the connection is reusable
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeEndpointError(200, event["error"]["message"])
                yield event
        finally:
            # An unread rest (the consumer stopped early, or an error) would be taken for the
            # next response on this connection.
            if response.isclosed():
                self._checkin(conn)
            else:
                conn.close()

    def get_model_info(self) -> dict:
        return self._call("GET", "/model_info")

    def get_server_info(self) -> dict:
        return self._call("GET", "/server_info")

    def get_tokenizer(self):
        """The server's tokenizer, chat template included, built here from the files it
        serves (GET /tokenizer/files): the same token ids and template as on the server,
        with no access to its model folder."""
        from transformers import AutoTokenizer

        listing = self._call("GET", "/tokenizer/files")["files"]
        with tempfile.TemporaryDirectory(prefix="loom-tokenizer-") as tmp:
            for entry in listing:
                name = entry["name"]
                if os.path.basename(name) != name or name.startswith("."):
                    raise RuntimeEndpointError(200, f"the server listed a bad file name {name!r}")
                data = self._fetch("GET", "/tokenizer/files/" + urllib.parse.quote(name))
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise RuntimeEndpointError(200, f"{name} arrived damaged (sha256 differs)")
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            return AutoTokenizer.from_pretrained(tmp)

    def flush_cache(self) -> dict:
        return self._call("POST", "/flush_cache")

    def health(self, timeout: float = HEALTH_TIMEOUT) -> bool:
        conn = self._new_connection(timeout)
        try:
            conn.request("GET", self._prefix + "/health", headers=self._auth)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def close(self) -> None:
        """Closes every thread's connection; each reconnects on its next request."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        return json.loads(self._fetch(method, path, body))

    def _fetch(self, method: str, path: str, body: dict | None = None) -> bytes:
        conn, response = self._send(method, path, body)
        try:
            data = response.read()
        except BaseException:
            conn.close()
            raise
        self._checkin(conn)
        _raise_for_error(response.status, data)
        return data

    def _send(
        self, method: str, path: str, body: dict | None
    ) -> tuple[_HTTPConnection, http.client.HTTPResponse]:
        """Sends on this thread's connection, and once more on a fresh one if the server had
        closed the reused one. After any error the connection is closed, not checked in."""
        conn = self._checkout()
        data = None if body is None else json.dumps(body).encode()
        headers = {**self._auth, **(JSON_HEADERS if data is not None else {})}
        reused = conn.sock is not None
        try:
            try:
                conn.request(method, self._prefix + path, data, headers)
                return conn, conn.getresponse()
            except STALE_CONNECTION_ERRORS:
                if not reused:
                    raise
                conn.close()  # the next request opens a fresh socket
                conn.request(method, self._prefix + path, data, headers)
                return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _checkout(self) -> _HTTPConnection:
        """This thread's idle connection, or a new one: on the first request, after an
        error, or while a stream this thread has not finished reading holds it."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return self._new_connection(self._timeout)
        self._local.conn = None
        return conn

    def _checkin(self, conn: _HTTPConnection) -> None:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = conn
        else:
            conn.close()

    def _new_connection(self, timeout: float | None) -> _HTTPConnection:
        """Connects lazily, on its first request (and again after a close)."""
        if self._https:
            conn: _HTTPConnection = _HTTPSConnection(
                self._host, self._port, timeout=timeout, context=_ssl_context()
            )
        else:
            conn = _HTTPConnection(self._host, self._port, timeout=timeout)
        with self._lock:
            self._connections.add(conn)
        return conn


def _raise_for_error(status: int, data: bytes) -> None:
    if status < 400:
        return
    text = data.decode("utf-8", errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    if status == 400:
        raise InvalidRequestError(message)
    if status == 401:
        message += f" (RuntimeEndpoint sends the key given as api_key=, else ${API_KEY_ENV})"
    raise RuntimeEndpointError(status, message)
