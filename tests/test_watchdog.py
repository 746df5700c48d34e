"""The watchdog (--watchdog-timeout): a child process that exits, or whose loop stops making
progress, is detected within the timeout; /health turns 503 naming it, requests in flight
end with an error, new ones get 503, and the server exits with status 1 for its supervisor
to restart. An idle server and a slow but progressing one are never declared hung.

Real servers (and an Engine) on the tiny Llama on CPU, with a 2 s timeout. Every process a
test stops is continued in a `finally`, so none is left stopped behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from loom.backends.runtime import Runtime
from loom.runtime.engine import Engine
from loom.runtime.tokenizer.manager import EngineDeadError
from loom.runtime.watchdog import Heartbeat, Watchdog
from tests.http_helpers import (
    alive,
    ipc_dirs,
    server_info,
    server_pids,
    sse_events,
    wait_until,
)

WATCHDOG_S = 2.0
DETECT_S = WATCHDOG_S + 3.0  # the timeout, plus a margin for a loaded machine
HANG_S = 60  # client timeouts: only a hang reaches them, failing the test
SERVER_ARGS = dict(
    device="cpu", max_total_tokens=16384, grammar_backend="none", watchdog_timeout=WATCHDOG_S
)
LONG = {"max_new_tokens": 16000, "ignore_eos": True, "temperature": 0}  # for long_llama
STREAM = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True}


@contextlib.contextmanager
def continued_at_exit(pids: list[int]) -> Iterator[None]:
    """SIGCONT every pid on the way out: a test that fails midway leaves none stopped."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# ---- the watchdog alone ----------------------------------------------------------------


class FakeChild:
    def __init__(self, pid: int = 4242):
        self.pid = pid
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def watched_child(tmp_path, timeout: float = WATCHDOG_S) -> tuple[Watchdog, FakeChild, Heartbeat]:
    heartbeat = Heartbeat.create(str(tmp_path / "child.heartbeat"), timeout)
    watchdog = Watchdog(timeout, on_failure=lambda reason: None)
    child = FakeChild()
    watchdog.watch("scheduler", child, heartbeat)
    return watchdog, child, heartbeat


def test_a_child_that_keeps_beating_is_never_hung(tmp_path):
    watchdog, _, heartbeat = watched_child(tmp_path)
    for now in range(0, 60):  # a minute of checks, a beat between each
        heartbeat.beat()
        assert watchdog.check(float(now)) is None


def test_a_child_silent_past_the_timeout_is_hung_and_named(tmp_path):
    watchdog, _, heartbeat = watched_child(tmp_path)
    heartbeat.beat()
    assert watchdog.check(100.0) is None  # the beat is seen: progress counted from here
    assert watchdog.check(100.0 + WATCHDOG_S) is None
    reason = watchdog.check(100.0 + WATCHDOG_S + 0.5)
    assert reason is not None
    assert "the scheduler process (pid 4242) has made no progress for 2.5s" in reason


def test_a_heartbeat_written_by_the_child_is_read_by_the_parent(tmp_path):
    """The child opens the parent's heartbeat from its pickled arguments (same file)."""
    import pickle

    parent = Heartbeat.create(str(tmp_path / "child.heartbeat"), 40.0)
    child = pickle.loads(pickle.dumps(parent))
    child.beat()
    child.beat()
    assert parent.count() == 2
    assert child.idle_s == 1.0  # an idle child beats at least every second


def test_an_exited_child_is_reported_with_its_signal(tmp_path):
    watchdog, child, _ = watched_child(tmp_path)
    child.code = -signal.SIGKILL
    assert watchdog.check(0.0) == "the scheduler process exited (pid 4242, killed by SIGKILL)"


# ---- a server whose child fails ----------------------------------------------------------


@pytest.mark.parametrize(
    "role, sig",
    [
        ("scheduler", signal.SIGSTOP),
        ("detokenizer", signal.SIGKILL),
        ("detokenizer", signal.SIGSTOP),
    ],
    ids=["frozen-scheduler", "killed-detokenizer", "frozen-detokenizer"],
)
def test_a_failed_child_fails_requests_turns_health_red_and_the_server_exits(
    long_llama, tmpdir_env, role, sig
):
    rt = Runtime(long_llama, **SERVER_ARGS)
    url = rt.url
    pids = server_pids(rt.process.pid)
    child = server_info(url)["process_ids"][role]
    expected = f"the {role} process exited" if sig == signal.SIGKILL else "made no progress"
    with continued_at_exit(pids):
        try:
            with httpx.stream("POST", url + "/generate", json=STREAM, timeout=HANG_S) as r:
                events = sse_events(r.iter_lines())
                next(events)
                os.kill(child, sig)
                failed_at = time.monotonic()
                rest = list(events)
            assert time.monotonic() - failed_at < DETECT_S
            assert rest[-1] == "[DONE]"
            assert role in rest[-2]["error"]["message"] and expected in rest[-2]["error"]["message"]
            health = httpx.get(url + "/health", timeout=HANG_S)
            assert health.status_code == 503
            assert f"unhealthy: the {role} process" in health.json()["error"]["message"]
            new = httpx.post(url + "/generate", json={"text": "t5"}, timeout=HANG_S)
            assert new.status_code == 503 and role in new.json()["error"]["message"]
            assert rt.process.wait(timeout=HANG_S) == 1  # for a supervisor to restart it
        finally:
            rt.shutdown()
    assert not [p for p in pids if alive(p)]
    assert ipc_dirs(tmpdir_env) == []


# ---- a server that is only idle, or slow ---------------------------------------------------


@pytest.fixture(scope="module")
def server(long_llama, tmpdir_env):
    rt = Runtime(long_llama, **SERVER_ARGS)
    yield rt
    rt.shutdown()


def healthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=HANG_S).status_code == 200


def test_an_idle_server_stays_healthy_for_several_timeouts(server):
    deadline = time.monotonic() + 4 * WATCHDOG_S
    while time.monotonic() < deadline:
        assert healthy(server.url)
        time.sleep(0.2)
    ok = httpx.post(
        server.url + "/generate",
        json={"text": "t5", "sampling_params": {"max_new_tokens": 2}},
        timeout=HANG_S,
    )
    assert ok.status_code == 200


def test_a_slow_but_progressing_stream_is_not_declared_hung(server):
    """The scheduler is paused for half the timeout again and again (a slow step each
    time), for four timeouts in all: each pause ends before the timeout, so it is slow,
    not hung, and the stream goes on."""
    scheduler = server_info(server.url)["process_ids"]["scheduler"]
    with httpx.stream("POST", server.url + "/generate", json=STREAM, timeout=HANG_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        for _ in range(8):
            os.kill(scheduler, signal.SIGSTOP)
            try:
                time.sleep(WATCHDOG_S / 2)
            finally:
                os.kill(scheduler, signal.SIGCONT)
            server_info(server.url)  # the scheduler answers: its loop came round
            assert healthy(server.url)
        assert "error" not in next(events)
    assert healthy(server.url)


# ---- the in-process Engine -----------------------------------------------------------------


def test_an_engine_fails_calls_in_flight_and_later_when_its_scheduler_freezes(tiny_llama):
    engine = Engine(tiny_llama, **{**SERVER_ARGS, "max_total_tokens": 1024})
    failures: list[str] = []
    engine.on_failure(failures.append)
    scheduler = engine.process_ids["scheduler"]
    try:
        with continued_at_exit([scheduler]):
            chunks = engine.generate(
                input_ids=[5, 6], sampling_params={**LONG, "max_new_tokens": 900}, stream=True
            )
            next(chunks)
            os.kill(scheduler, signal.SIGSTOP)
            frozen_at = time.monotonic()
            with pytest.raises(EngineDeadError, match="the scheduler process .* no progress"):
                for _ in chunks:
                    pass
            assert time.monotonic() - frozen_at < DETECT_S
            with pytest.raises(EngineDeadError):
                engine.generate(input_ids=[5], sampling_params={"max_new_tokens": 1})
            assert wait_until(lambda: failures, DETECT_S)  # the callback runs once
            assert len(failures) == 1 and "scheduler" in failures[0]
    finally:
        engine.shutdown()
