"""RuntimeEndpoint: a running `loom serve`, reached over HTTP with the native API. The
language layer builds on `generate`; results have the Engine's shape."""

from __future__ import annotations

import functools
import json
import ssl
import threading
from collections.abc import Iterator

import httpx

from loom.runtime.sampling_params import InvalidRequestError


class RuntimeEndpointError(RuntimeError):
    """The server answered with an error (other than a bad request)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: httpx loads the CA bundle for every client otherwise (~26 ms each)."""
    return ssl.create_default_context()


class RuntimeEndpoint:
    def __init__(self, url: str, timeout: float | None = None):
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._local = threading.local()

    @property
    def _client(self) -> httpx.Client:
        """One client per thread: run_batch calls from hundreds of threads, and a shared
        httpx pool under that load closed sockets other threads were reading
        ("Bad file descriptor", seen with 256 programs on a 16-core machine)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(
                base_url=self.url, timeout=self._timeout, verify=_ssl_context()
            )
        return client

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
        response = self._client.post("/generate", json=body)
        _raise_for_error(response)
        return response.json()

    def _stream(self, body: dict) -> Iterator[dict]:
        with self._client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                response.read()
                _raise_for_error(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeEndpointError(200, event["error"]["message"])
                yield event

    def get_model_info(self) -> dict:
        return self._get("/model_info")

    def get_server_info(self) -> dict:
        return self._get("/server_info")

    def flush_cache(self) -> dict:
        response = self._client.post("/flush_cache")
        _raise_for_error(response)
        return response.json()

    def health(self) -> bool:
        try:
            return self._client.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def _get(self, path: str) -> dict:
        response = self._client.get(path)
        _raise_for_error(response)
        return response.json()

    def close(self) -> None:
        self._client.close()


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    if response.status_code == 400:
        raise InvalidRequestError(message)
    raise RuntimeEndpointError(response.status_code, message)
