"""The waiting queue: requests taken in but not admitted yet. Ready ones wait in arrival
order, a retracted one in front; a constrained one first waits for its grammar, which
compiles on the backend's threads (GrammarWait). Each admission round takes the ready ones
in the schedule policy's order (policy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

from loom.runtime.scheduler.grammar_wait import GrammarWait
from loom.runtime.scheduler.policy import SchedulePolicy
from loom.runtime.scheduler.request import Req


class WaitingQueue:
    def __init__(self, policy: SchedulePolicy, grammar_compile_timeout: float):
        self.policy = policy
        self.ready: list[Req] = []
        self.compiling = GrammarWait(grammar_compile_timeout)

    def add(self, req: Req, matcher: Future | None = None) -> None:
        """Queue req; with a grammar matcher still compiling, once it is ready."""
        if matcher is None:
            self.ready.append(req)
        else:
            self.compiling.add(req, matcher)

    def requeue(self, req: Req) -> None:
        """A retracted request: admitted again before the others."""
        self.ready.insert(0, req)

    def poll_grammars(self) -> list[tuple[Req, str]]:
        """Make the requests whose grammar compiled ready; returns each one whose compile
        failed or ran out of time, with why (it leaves the queue)."""
        ready, failed = self.compiling.poll()
        self.ready.extend(ready)
        return failed

    def remove(self, rid: str) -> list[Req]:
        """Take the requests named rid out of the queue; returns them, ready ones first."""
        gone = [r for r in self.ready if r.rid == rid] + self.compiling.remove(rid)
        self.ready = [r for r in self.ready if r.rid != rid]
        return gone

    def in_admission_order(self) -> list[Req]:
        """The ready requests as an admission round takes them (counts a round each)."""
        return self.policy.order(self.ready)

    def aged(self, req: Req) -> bool:
        """Whether req waited so long that admission stops passing it over."""
        return self.policy.aged(req)

    def take(self, admitted: list[Req]) -> None:
        """The requests an admission round admitted leave the queue."""
        taken = {id(r) for r in admitted}
        self.ready = [r for r in self.ready if id(r) not in taken]

    def __iter__(self) -> Iterator[Req]:
        return iter(self.ready)

    def __len__(self) -> int:
        """The ready requests (those compiling their grammar: len(compiling))."""
        return len(self.ready)
