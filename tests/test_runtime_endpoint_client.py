"""RuntimeEndpoint's HTTP client against a stdlib server that plays `loom serve`'s wire format
(JSON, chunked server-sent events, `{"error": {"message": ...}}` bodies): keep-alive reuse,
threads, streams, error mapping, reconnects after the server drops a connection, close().
No model needed."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loom.backends.runtime_endpoint import RuntimeEndpoint, RuntimeEndpointError
from loom.runtime.sampling.params import InvalidRequestError
from tests.http_helpers import wait_until

WAIT_S = 60  # bounds waits that only a broken client or server would reach
CLIENT_THREADS = 8


class FakeServer(ThreadingHTTPServer):
    """Records what it saw: accepted connections, finished ones, request paths and bodies.
    A request with "meet" answers only once CLIENT_THREADS such requests are in the server
    at once (else it answers 500); one with "hold" answers only after `release` is set."""

    daemon_threads = True
    request_queue_size = 64  # 8 threads connect at once; a full backlog costs a 1 s SYN retry

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.accepted = 0
        self.finished = 0
        self.open: set[socket.socket] = set()
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self.meeting = threading.Barrier(CLIENT_THREADS, timeout=WAIT_S)
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        """A client hanging up mid-answer (a stream stopped early, a timeout) is expected."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Closes every kept-alive connection, as a server does with idle ones."""
        with self.lock:
            for sock in self.open:
                sock.shutdown(socket.SHUT_RDWR)
        assert wait_until(lambda: self.finished == self.accepted, timeout=WAIT_S)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.accepted += 1
            self.server.open.add(self.connection)

    def finish(self):
        super().finish()
        with self.server.lock:
            self.server.finished += 1
            self.server.open.discard(self.connection)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        self.send_json(200, {"path": self.path})

    def do_POST(self):
        self.server.paths.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
        self.server.bodies.append(body)
        body = body or {}
        if body.get("hold"):
            self.server.release.wait(WAIT_S)
        if body.get("meet"):
            try:
                self.server.meeting.wait()
            except threading.BrokenBarrierError:
                body = {"status": 500, "message": "the requests were not in flight at once"}
        if "status" in body:
            self.send_json(body["status"], {"error": {"message": body["message"]}})
        elif body.get("hangup"):
            self.close_connection = True  # no response at all
        elif body.get("stream"):
            self.send_events(body)
        else:
            self.send_json(200, {"text": "ok", "received": body})

    def send_json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_events(self, body: dict):
        events = [{"text": f"t{i}"} for i in range(body.get("chunks", 3))]
        if body.get("fail_midway"):
            events.insert(1, {"error": {"message": "out of memory", "code": 500}})
        lines = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if body.get("until_close"):  # no length, no chunks: the body ends when the socket does
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            self.wfile.write(b"".join(lines))
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def endpoint(server):
    ep = RuntimeEndpoint(server.url)
    yield ep
    ep.close()


def test_generate_returns_the_servers_json(server, endpoint):
    out = endpoint.generate("hello", {"max_new_tokens": 4}, return_logprob=True)
    assert out == {
        "text": "ok",
        "received": {
            "text": "hello",
            "sampling_params": {"max_new_tokens": 4},
            "stream": False,
            "return_logprob": True,
        },
    }
    assert server.paths == ["/generate"]


def test_the_server_receives_the_json_sent(server, endpoint):
    endpoint.generate(input_ids=[[1, 2], [3]], sampling_params=[{"n": 1}, {"n": 2}])
    assert server.bodies == [
        {"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 1}, {"n": 2}], "stream": False}
    ]


def test_a_path_prefix_in_the_url_is_kept(server):
    ep = RuntimeEndpoint(server.url + "/loom/")
    ep.generate("x")
    assert ep.get_model_info() == {"path": "/loom/model_info"}
    assert server.paths == ["/loom/generate", "/loom/model_info"]


def test_sequential_requests_reuse_one_connection(server, endpoint):
    for i in range(5):
        assert endpoint.generate(str(i))["received"]["text"] == str(i)
    endpoint.get_server_info()
    endpoint.flush_cache()
    assert server.accepted == 1
    assert server.paths[-2:] == ["/server_info", "/flush_cache"]


def test_the_connection_has_nagle_off(endpoint):
    endpoint.generate("x")
    sock = endpoint._local.conn.sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_threads_send_concurrently_each_on_its_own_connection(server, endpoint):
    # The server answers each round only once all threads' requests are in it at once.
    results: dict[int, list[str]] = {}

    def work(t: int):
        results[t] = [
            endpoint.generate(f"{t}-{i}", meet=True)["received"]["text"] for i in range(3)
        ]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t: [f"{t}-{i}" for i in range(3)] for t in range(CLIENT_THREADS)}
    assert server.accepted == CLIENT_THREADS


def test_a_stream_yields_its_chunks_in_order_until_done(server, endpoint):
    chunks = list(endpoint.generate("x", stream=True, chunks=4))
    assert chunks == [{"text": f"t{i}"} for i in range(4)]
    assert server.bodies[0]["stream"] is True
    endpoint.generate("after")  # the stream was read to its end: the connection is reused
    assert server.accepted == 1


def test_a_stream_that_ends_with_the_connection_then_reconnects(server, endpoint):
    chunks = list(endpoint.generate("x", stream=True, chunks=2, until_close=True))
    assert chunks == [{"text": "t0"}, {"text": "t1"}]
    assert endpoint.generate("after")["received"]["text"] == "after"
    assert server.accepted == 2


def test_an_error_event_in_a_stream_raises(endpoint):
    chunks = endpoint.generate("x", stream=True, fail_midway=True)
    assert next(chunks) == {"text": "t0"}
    with pytest.raises(RuntimeEndpointError, match="out of memory") as e:
        next(chunks)
    assert e.value.status == 200
    assert endpoint.generate("after")["received"]["text"] == "after"


def test_two_streams_read_in_turn_on_one_thread(endpoint):
    a = endpoint.generate("a", stream=True, chunks=3)
    b = endpoint.generate("b", stream=True, chunks=3)
    assert list(zip(a, b)) == [({"text": f"t{i}"}, {"text": f"t{i}"}) for i in range(3)]


def test_a_request_after_a_stream_stopped_early_gets_its_own_answer(server, endpoint):
    chunks = endpoint.generate("x", stream=True, chunks=50)
    assert next(chunks) == {"text": "t0"}
    chunks.close()
    assert endpoint.generate("after") == {
        "text": "ok",
        "received": {"text": "after", "stream": False},
    }
    assert server.accepted == 2  # the unread stream's connection was closed, not reused


def test_400_raises_invalid_request_with_the_servers_message(endpoint):
    with pytest.raises(InvalidRequestError) as e:
        endpoint.generate("x", status=400, message="top_p must be in (0, 1]")
    assert str(e.value) == "top_p must be in (0, 1]"


def test_500_raises_runtime_endpoint_error_with_its_status(server, endpoint):
    with pytest.raises(RuntimeEndpointError, match="engine died") as e:
        endpoint.generate("x", status=500, message="engine died")
    assert e.value.status == 500
    endpoint.generate("after")  # an error answer leaves the connection usable
    assert server.accepted == 1


def test_an_error_status_on_a_stream_raises_before_any_chunk(endpoint):
    with pytest.raises(InvalidRequestError, match="bad regex"):
        next(endpoint.generate("x", stream=True, status=400, message="bad regex"))


def test_a_connection_the_server_closed_while_idle_is_replaced(server, endpoint):
    endpoint.generate("first")
    server.drop_connections()
    assert endpoint.generate("second")["received"]["text"] == "second"
    assert server.accepted == 2
    assert [b["text"] for b in server.bodies] == ["first", "second"]  # sent once each


def test_a_reused_connection_is_retried_once_then_the_error_raised(server, endpoint):
    endpoint.generate("first")
    with pytest.raises(http.client.RemoteDisconnected):
        endpoint.generate("x", hangup=True)
    assert [b.get("hangup") for b in server.bodies] == [None, True, True]
    assert endpoint.generate("after")["received"]["text"] == "after"


def test_a_fresh_connection_is_not_retried(server, endpoint):
    with pytest.raises(http.client.RemoteDisconnected):
        endpoint.generate("x", hangup=True)
    assert len(server.bodies) == 1


def test_a_timeout_raises_and_the_next_request_starts_clean(server):
    ep = RuntimeEndpoint(server.url, timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            ep.generate("held", hold=True)  # not answered until after the timeout
        server.release.set()
        assert ep.generate("fast")["received"]["text"] == "fast"
    finally:
        server.release.set()
        ep.close()


def test_close_closes_connections_of_other_threads(server, endpoint):
    opened, closed = threading.Event(), threading.Event()
    answers = []

    def work():
        answers.append(endpoint.generate("before")["text"])
        opened.set()
        closed.wait(WAIT_S)
        answers.append(endpoint.generate("after")["text"])  # reconnects lazily

    thread = threading.Thread(target=work)
    thread.start()
    assert opened.wait(WAIT_S)
    endpoint.close()
    assert wait_until(lambda: server.finished == 1, timeout=WAIT_S)
    closed.set()
    thread.join()
    assert answers == ["ok", "ok"]
    assert server.accepted == 2


def test_a_thread_that_ended_leaves_no_open_connection(server, endpoint):
    thread = threading.Thread(target=endpoint.generate, args=("x",))
    thread.start()
    thread.join()
    assert server.accepted == 1
    assert wait_until(lambda: server.finished == 1, timeout=WAIT_S)


def test_health_is_true_for_a_live_server(server, endpoint):
    assert endpoint.health()
    assert server.paths == ["/health"]


def test_health_is_false_where_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert RuntimeEndpoint(f"http://127.0.0.1:{port}").health() is False
