"""The edge of a live `loom serve` started with an API key and a 4 MiB body limit, on a tiny
Llama (issue 17): the key guards every route but the health checks and /metrics, a body
over the limit gets 413 before it is read, a body not sent as JSON gets 415, and a large
prompt is tokenized off the event loop while /health and other clients are answered."""

from __future__ import annotations

import asyncio
import socket
import urllib.parse

import httpx
import openai
import psutil
import pytest

from loom.backends.runtime import Runtime
from loom.backends.runtime_endpoint import RuntimeEndpoint, RuntimeEndpointError
from loom.cli import build_parser
from loom.runtime.args import API_KEY_ENV, ServerArgs
from loom.runtime.http.guard import configured_api_key

KEY = "sk-loom-test-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_TYPE = {"Content-Type": "application/json"}
LIMIT = 4 * 2**20
WAIT_S = 60  # bounds on answers that only a hang would reach
SERVER_ARGS = dict(device="cpu", max_total_tokens=4096, grammar_backend="none")


@pytest.fixture(scope="module")
def server(long_llama, tmpdir_env):
    with Runtime(long_llama, **SERVER_ARGS, api_key=KEY, max_request_body_bytes=LIMIT) as rt:
        yield rt


def _is_error(r: httpx.Response, status: int, code: str | None = None) -> bool:
    error = r.json()["error"]
    return r.status_code == status and isinstance(error["message"], str) and error["code"] == code


# ---- the API key ------------------------------------------------------------------------

GUARDED = [
    ("GET", "/model_info"),
    ("GET", "/get_model_info"),
    ("GET", "/server_info"),
    ("GET", "/get_server_info"),
    ("GET", "/v1/models"),
    ("POST", "/generate"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/flush_cache"),
    ("POST", "/abort_request"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize("method, path", GUARDED)
def test_every_route_but_health_and_metrics_needs_the_key(server, method, path):
    def call(headers: dict) -> httpx.Response:
        body = {"rid": "nobody"} if method == "POST" else None
        return httpx.request(method, server.url + path, json=body, headers=headers, timeout=WAIT_S)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        refused = call(headers)
        assert _is_error(refused, 401, "invalid_api_key"), refused.text
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert call(AUTH).status_code != 401


@pytest.mark.parametrize("path", ["/health", "/health_generate", "/metrics"])
def test_health_checks_and_metrics_need_no_key(server, path):
    assert httpx.get(server.url + path, timeout=WAIT_S).status_code == 200


def test_the_openai_client_is_let_in_by_its_api_key(server):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

    model = client(KEY).models.list().data[0].id
    done = client(KEY).completions.create(model=model, prompt="t5 t6", max_tokens=2)
    assert done.usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError, match="API key is wrong"):
        client("wrong").completions.create(model=model, prompt="t5 t6", max_tokens=2)


def test_server_info_needs_the_key_and_never_shows_it(server):
    assert httpx.get(server.url + "/server_info", timeout=WAIT_S).status_code == 401
    info = httpx.get(server.url + "/server_info", headers=AUTH, timeout=WAIT_S)
    assert info.status_code == 200 and "process_ids" in info.json()
    assert KEY not in info.text and "api_key" not in info.json()["args"]


def test_the_key_is_not_on_the_server_command_line(server):
    """Runtime hands it over in the environment: any local user can read a command line."""
    assert KEY not in " ".join(psutil.Process(server.process.pid).cmdline())


def test_runtime_endpoint_sends_its_key(server, monkeypatch):
    params = {"max_new_tokens": 2, "temperature": 0}
    assert len(RuntimeEndpoint(server.url, api_key=KEY).generate("t5", params)["output_ids"]) == 2
    assert server.endpoint.get_server_info()["max_total_tokens"] == 4096  # Runtime's own
    with pytest.raises(RuntimeEndpointError, match="API key is wrong") as refused:
        RuntimeEndpoint(server.url, api_key="wrong").generate("t5", params)
    assert refused.value.status == 401
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert RuntimeEndpoint(server.url).flush_cache()["status"] == "ok"


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch):
    ns = build_parser().parse_args(["serve", "--api-key", "from-flag"])
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert configured_api_key(ServerArgs.from_cli(ns).api_key) == "from-flag"
    assert configured_api_key(None) == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert configured_api_key(None) is None


# ---- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_gets_415(server, path, content_type):
    """A web page may send text/plain or a form to any server without a preflight."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(server.url + path, content=b'{"text": "t5"}', headers=headers, timeout=WAIT_S)
    assert _is_error(r, 415) and "application/json" in r.json()["error"]["message"]


def _raw_request(url: str, head: dict[str, str], body: bytes) -> tuple[bytes, bytes]:
    """Sends the request line, `head` and `body` (only as much of the body as given: a
    server waiting for the rest never answers); returns the answer's status line and body."""
    parts = urllib.parse.urlsplit(url)
    lines = ["POST /generate HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in {**AUTH, **JSON_TYPE, **head}.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = sock.makefile("rb")
        status = answer.readline()
        length = 0
        while (line := answer.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            length = int(value) if name.lower() == b"content-length" else length
        return status, answer.read(length)


def test_a_body_declared_over_the_limit_gets_413_unread(server):
    """10 GB declared, one byte sent: the answer comes without waiting for the rest."""
    status, answer = _raw_request(server.url, {"Content-Length": str(10**10)}, b"{")
    assert status.startswith(b"HTTP/1.1 413 ") and b"--max-request-body-bytes" in answer


def test_a_chunked_body_gets_413_once_it_passes_the_limit(server):
    """A chunked body declares no length: it is counted as it arrives, and refused without
    its end (never sent here)."""
    chunk = b"t5 " * 20_000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    status, answer = _raw_request(server.url, {"Transfer-Encoding": "chunked"}, chunks)
    assert status.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in answer
    good = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}
    r = httpx.post(server.url + "/generate", json=good, headers=AUTH, timeout=WAIT_S)
    assert r.status_code == 200


def test_a_body_just_under_the_limit_is_read(server):
    text = "t5 " * ((LIMIT - 100) // 3)
    r = httpx.post(server.url + "/generate", json={"text": text}, headers=AUTH, timeout=WAIT_S)
    assert _is_error(r, 400) and "context length" in r.json()["error"]["message"]


# ---- the event loop ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, field", [("/generate", "text"), ("/v1/completions", "prompt")], ids=["native", "openai"]
)
def test_health_and_other_clients_are_answered_while_a_large_prompt_is_tokenized(
    server, path, field
):
    """Tokenizing ~1.3M words takes seconds; it once ran on the event loop, and /health
    waited for it. Ordering only: /health and a small request, sent once the server says it
    is preparing the large one, are answered before it."""
    large = {field: "t5 " * ((LIMIT - 100) // 3)}  # refused after tokenizing: too long
    small = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}
    order: list[str] = []

    async def send(name: str, coro) -> httpx.Response:
        response = await coro
        order.append(name)
        return response

    async def run() -> tuple[httpx.Response, ...]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=WAIT_S) as c:
            big = asyncio.create_task(send("large", c.post(path, json=large)))
            while (await c.get("/server_info")).json()["preparing_requests"] == 0:
                assert not big.done(), "the large request ended before it was seen preparing"
                await asyncio.sleep(0.01)
            health = await send("health", c.get("/health"))
            quick = await send("small", c.post("/generate", json=small))
            return health, quick, await big

    health, quick, big = asyncio.run(run())
    assert order == ["health", "small", "large"]
    assert health.status_code == 200 and quick.status_code == 200
    assert _is_error(big, 400) and "context length" in big.json()["error"]["message"]
