"""`loom serve` as a process, on a tiny Llama: the queue cap, a killed scheduler (the server
exits for its supervisor), shutdown by signal and by the parent's death with nothing left
behind, a failed start. Frozen and killed children of every kind: test_watchdog.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from loom.backends.runtime import Runtime, RuntimeStartError
from tests.http_helpers import (
    alive,
    ipc_dirs,
    is_idle,
    server_info,
    server_pids,
    sse_events,
    wait_until,
)

SERVER_ARGS = dict(device="cpu", max_total_tokens=4096, grammar_backend="none")
LONG = {"max_new_tokens": 16000, "ignore_eos": True, "temperature": 0}  # for long_llama
WAIT_S = 60  # bounds on waits and answers that only a hang would reach


@pytest.fixture(scope="module")
def server(long_llama, tmpdir_env):
    """One server for the tests below, which run in file order: the second kills its
    scheduler, which ends it. It runs one request at a time and queues one more."""
    args = {**SERVER_ARGS, "max_total_tokens": 2 * 16384}  # room for a LONG running and one queued
    rt = Runtime(long_llama, **args, max_running_requests=1, max_queued_requests=1)
    yield rt
    rt.shutdown()


def test_requests_beyond_the_queue_cap_get_503(server):
    url = server.url
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True}
    with (
        httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as running,
        httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as queued,
    ):
        first = sse_events(running.iter_lines())  # kept: dropping it closes the response
        next(first)
        assert queued.status_code == 200
        for path, request in [("/generate", {"text": "t5"}), ("/v1/completions", {"prompt": "t5"})]:
            over = httpx.post(url + path, json=request, timeout=WAIT_S)
            assert over.status_code == 503
            assert "at capacity" in over.json()["error"]["message"]
    # Both clients left: their requests were aborted and the server takes new ones.
    assert wait_until(lambda: is_idle(server_info(url)), WAIT_S)
    ok = httpx.post(
        url + "/generate",
        json={"text": "t5", "sampling_params": {"max_new_tokens": 1}},
        timeout=WAIT_S,
    )
    assert ok.status_code == 200


def test_a_killed_scheduler_fails_requests_then_the_server_exits(server, tmpdir_env):
    url = server.url
    pids = server_pids(server.process.pid)
    scheduler = server_info(url)["process_ids"]["scheduler"]
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        os.kill(scheduler, signal.SIGKILL)
        rest = list(events)
    assert rest[-1] == "[DONE]" and "scheduler" in rest[-2]["error"]["message"]
    assert wait_until(lambda: httpx.get(url + "/health", timeout=WAIT_S).status_code == 503, WAIT_S)
    # Answered with an error, not left waiting for a scheduler that is gone (a hang would
    # end in the client's timeout, raising).
    native = httpx.post(url + "/generate", json={"text": "t5"}, timeout=WAIT_S)
    completion = httpx.post(url + "/v1/completions", json={"prompt": "t5"}, timeout=WAIT_S)
    for r in (native, completion):
        assert r.status_code == 503
        assert "scheduler process exited" in r.json()["error"]["message"]
    # Then it exits with status 1, for a supervisor to restart it, leaving nothing behind.
    assert server.process.wait(timeout=WAIT_S) == 1
    assert not [p for p in pids if alive(p)]
    assert ipc_dirs(tmpdir_env) == []


def test_sigint_stops_the_server_leaving_no_process_or_socket(tiny_llama, tmpdir_env):
    rt = Runtime(tiny_llama, **SERVER_ARGS)
    try:
        pids = server_pids(rt.process.pid)
        assert ipc_dirs(tmpdir_env)
        rt.process.send_signal(signal.SIGINT)
        assert rt.process.wait(timeout=WAIT_S) == 0
    finally:
        rt.shutdown()
    assert not [p for p in pids if alive(p)]
    assert ipc_dirs(tmpdir_env) == []


def test_the_server_exits_when_the_program_that_started_it_dies(tiny_llama, tmpdir_env):
    script = (
        "import time\n"
        "from loom.backends.runtime import Runtime\n"
        f"rt = Runtime({tiny_llama!r}, **{SERVER_ARGS!r})\n"
        "print(rt.url, flush=True)\n"
        "time.sleep(600)\n"
    )
    program = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = program.stdout.readline().strip()
        pids = list(server_info(url)["process_ids"].values())
    finally:
        program.kill()
        program.wait()
    assert wait_until(lambda: not [p for p in pids if alive(p)], WAIT_S)
    assert ipc_dirs(tmpdir_env) == []


def test_runtime_start_failure_shows_the_server_log(tmp_path):
    with pytest.raises(RuntimeStartError, match="has no config.json"):
        Runtime(str(tmp_path), **SERVER_ARGS)
