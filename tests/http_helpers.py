"""Small helpers for the server tests: SSE parsing, polling, process checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import httpx
import psutil
import pytest


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """`data: {...}` lines -> dicts; `data: [DONE]` -> "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def server_info(url: str) -> dict:
    return httpx.get(url + "/server_info", timeout=60).json()


def is_idle(info: dict) -> bool:
    """No request runs, waits or holds KV (the prefix cache may keep evictable tokens)."""
    return (
        info["running_requests"] == 0
        and info["waiting_requests"] == 0
        and info["tokens_in_use"] == 0
        and info["in_flight_requests"] == 0
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def server_tmpdir() -> Iterator[str]:
    """A fresh TMPDIR for servers started inside, where their ipc socket folders appear
    (short: socket paths are limited to 107 bytes)."""
    root = tempfile.mkdtemp(prefix="lt-")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", root)
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ipc_dirs(root: str) -> list[str]:
    return [p for p in os.listdir(root) if p.startswith("loom-ipc-")]


def server_pids(server_pid: int) -> list[int]:
    return [server_pid] + [c.pid for c in psutil.Process(server_pid).children(recursive=True)]
