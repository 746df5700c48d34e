"""Errors one request causes inside the scheduler's step loop, told apart from the
scheduler's own, so that no single request can stop a server meant to run for months.

An error is a request's when it is raised while the scheduler works on that request
alone, or when a batch built from many requests fails and that request fails alone:
- taking the request in (Scheduler.add_request);
- its share of processing a step's tokens: grammar, finish checks, stop strings,
  streaming, jump-forward drafts (Scheduler._process, JumpForward.run_decode_step);
- building a step's sampling batch from the requests' values (seeds, top_k, stop ids):
  on a failure each request's row is built alone, and the rows that fail are the
  culprits (StepSampler.sample raises RowFaults before it has touched the logits).
That request is aborted with the error named (finish reason abort), its KV freed, and the
loop goes on. Any other error (a forward, the KV pool, a batch that no single request
explains) is the scheduler's or the device's: it propagates, and process.py fails every
request in flight and exits, as a crash must.
"""

from __future__ import annotations

from collections.abc import Callable

from loom.runtime.scheduler.request import FinishReason, Req


class RowFaults(Exception):
    """Rows of a batch that fail on their own: (index in the batch, its error)."""

    def __init__(self, rows: list[tuple[int, Exception]]):
        super().__init__(f"{len(rows)} request(s) fail alone: {rows[0][1]!r}")
        self.rows = rows


def find_culprits(reqs: list[Req], build: Callable[[list[Req]], object]) -> RowFaults | None:
    """The rows whose batch, built for that request alone, fails (None when none does:
    the error is not any one request's)."""
    rows = []
    for i, req in enumerate(reqs):
        try:
            build([req])
        except Exception as exc:  # noqa: BLE001 - collected: this row is a culprit
            rows.append((i, exc))
    return RowFaults(rows) if rows else None


def fault_reason(exc: BaseException) -> FinishReason:
    """What the client of a request that raised is told."""
    message = f"internal error on this request, which was aborted: {type(exc).__name__}: {exc}"
    return FinishReason("abort", None, message)
