"""Liveness of the Engine's child processes: each one's loop beats a heartbeat, and a
watchdog thread in the parent declares a child failed when it exits or stops beating.

The heartbeat is a counter in a shared 8-byte file mapping, not a message: it costs one
store per loop iteration, cannot queue up behind outputs nor be lost, and is read without
the child's help (a frozen child cannot answer a ping). The parent only asks whether the
number changed, and times that on its own clock, so no clock is shared between processes
and even a torn read could show progress once but never fake a hang.

Progress means "the child's loop came round again". A loop that waits for work wakes at
least every `idle_s` to beat, so an idle server is never hung; a long workload beats at
every step, so it is never hung either. A single step that takes longer than the timeout
is indistinguishable from a hang: the timeout must exceed the longest step, first-use
kernel compiles (FlashInfer JIT, Triton) included. Start-up (weights, CUDA graph capture)
is not watched: the parent starts watching once every child has reported ready.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHECK_INTERVAL_S = 0.1  # how often the watchdog looks: a child's exit is seen this fast
MAX_IDLE_S = 1.0  # an idle child beats at least this often, whatever the timeout
_COUNT = struct.Struct("=Q")


class Heartbeat:
    """A child's loop counter in a file both processes map. The parent creates it (in the
    Engine's ipc folder, removed at shutdown); pickled into a child's arguments, it opens
    the same file there. Invariant: only the child writes it."""

    def __init__(self, path: str, idle_s: float, create: bool = False):
        self.path = path
        self.idle_s = idle_s
        self._beats = 0
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, _COUNT.size)
            self._map = mmap.mmap(fd, _COUNT.size)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, path: str, timeout: float) -> Heartbeat:
        """A new heartbeat for a child watched with `timeout`: idle, it beats four times
        per timeout, so one late wake-up is no hang."""
        return cls(path, min(MAX_IDLE_S, timeout / 4), create=True)

    def __reduce__(self):
        return (Heartbeat, (self.path, self.idle_s))

    @property
    def idle_ms(self) -> int:
        """The longest a waiting loop may block between beats (a zmq poll timeout)."""
        return max(1, int(self.idle_s * 1000))

    def beat(self) -> None:
        """The child: one more turn of its loop."""
        self._beats += 1
        _COUNT.pack_into(self._map, 0, self._beats)

    def count(self) -> int:
        """The parent: the child's turns so far."""
        return _COUNT.unpack_from(self._map, 0)[0]


@dataclass
class Watched:
    """One child as the watchdog sees it: the count it last read, and when it changed."""

    name: str
    proc: subprocess.Popen
    heartbeat: Heartbeat
    count: int = 0
    since: float = field(default_factory=time.monotonic)


class Watchdog:
    """Checks every child each CHECK_INTERVAL_S on a daemon thread; on the first failure,
    calls `on_failure(reason)` once (on that thread) and stops."""

    def __init__(self, timeout: float, on_failure: Callable[[str], None]):
        self.timeout = timeout
        self.on_failure = on_failure
        self.watched: list[Watched] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loom-watchdog")

    def watch(self, name: str, proc, heartbeat: Heartbeat) -> None:
        self.watched.append(Watched(name, proc, heartbeat, heartbeat.count()))

    def start(self) -> None:
        """Begin watching: every child's progress is counted from now."""
        now = time.monotonic()
        for w in self.watched:
            w.count, w.since = w.heartbeat.count(), now
        self._thread.start()

    def stop(self) -> None:
        """No failure is reported after this returns (shutdown stops children on purpose)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            reason = self.check(time.monotonic())
            if reason is not None and not self._stop.is_set():
                self.on_failure(reason)
                return

    def check(self, now: float) -> str | None:
        """Why a child failed (an exit first, else the longest without progress), or None."""
        for w in self.watched:
            code = w.proc.poll()
            if code is not None:
                return f"the {w.name} process exited (pid {w.proc.pid}, {_exit_status(code)})"
        for w in self.watched:
            count = w.heartbeat.count()
            if count != w.count:
                w.count, w.since = count, now
        stalled = max(self.watched, key=lambda w: now - w.since, default=None)
        if stalled is None or now - stalled.since <= self.timeout:
            return None
        return (
            f"the {stalled.name} process (pid {stalled.proc.pid}) has made no progress for "
            f"{now - stalled.since:.1f}s (--watchdog-timeout {self.timeout:g}s): it is stopped, "
            "deadlocked, or in a step longer than the timeout"
        )


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
