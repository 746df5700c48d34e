"""Constrained requests waiting for their grammar: it compiles on the backend's threads,
never on the scheduler's, and a request joins the waiting queue once it is ready."""

from __future__ import annotations

import time
from concurrent.futures import Future

from loom.runtime.scheduler.request import Req


class GrammarWait:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._waits: list[tuple[Req, Future, float]] = []  # (request, matcher, deadline)

    def add(self, req: Req, matcher: Future) -> None:
        self._waits.append((req, matcher, time.monotonic() + self.timeout))

    def poll(self) -> tuple[list[Req], list[tuple[Req, str]]]:
        """(the requests whose grammar is ready, req.grammar set; each request whose
        compile failed or ran out of time, with why). Both leave the wait."""
        ready, failed, still = [], [], []
        for req, matcher, deadline in self._waits:
            if matcher.done():
                try:
                    req.grammar = matcher.result()
                except Exception as e:  # noqa: BLE001 - any compile failure fails only this request
                    failed.append((req, f"grammar error: {e}"))
                    continue
                ready.append(req)
            elif time.monotonic() > deadline:
                failed.append((req, "grammar compile timed out"))
            else:
                still.append((req, matcher, deadline))
        self._waits = still
        return ready, failed

    def remove(self, rid: str) -> list[Req]:
        """Take the requests named rid out of the wait; returns them."""
        gone = [w[0] for w in self._waits if w[0].rid == rid]
        self._waits = [w for w in self._waits if w[0].rid != rid]
        return gone

    def __len__(self) -> int:
        return len(self._waits)
