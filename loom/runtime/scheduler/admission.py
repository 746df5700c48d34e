"""Admission control: whether a request can ever run, and which waiting requests join
the next extend batch.

A request is admitted while the KV budget (free slots + evictable cache) covers its new
tokens plus a reserve for the future tokens of everything running. The reserve counts
each request's remaining tokens (max_new_tokens, cut at the context and the pool: no
request can hold more) times the new-token ratio (NewTokenRatio), an estimate of how much of that budget
requests really use; retraction corrects an estimate that was too low.

No head-of-line blocking: a request the KV left cannot take is passed over, and those
behind it are admitted while they fit. Once it is aged (it waited the policy's
max_wait_rounds rounds) it stops the round instead: nothing behind it is admitted until
the running requests have freed enough KV for it. It cannot wait forever: with nothing
running, any admissible request fits (its prompt fits the pool, and a retracted request
is requeued only while its tokens do). A round passes over at most MAX_PASSED_OVER
requests and ends once no KV is left beyond the reserve, so a long queue is not matched
against the cache whole at every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loom.runtime.scheduler.kv_ops import KVOps
from loom.runtime.scheduler.request import Req


def admissibility_problem(req: Req, runner, grammar_enabled: bool) -> str | None:
    """Why `req` can never run on this model and pool (None when it can)."""
    n = len(req.origin_input_ids)
    if n == 0:
        return "the prompt is empty"
    if n >= runner.context_len:
        return f"the prompt has {n} tokens; the context length is {runner.context_len}"
    if n + 1 > runner.max_total_tokens:
        return f"the prompt ({n} tokens) does not fit the KV pool ({runner.max_total_tokens})"
    if max(req.origin_input_ids) >= runner.vocab_size or min(req.origin_input_ids) < 0:
        return f"input_ids must be in [0, {runner.vocab_size})"
    if req.sampling.constraint is not None and not grammar_enabled:
        return "constrained decoding is disabled (--grammar-backend none)"
    return None


MAX_PASSED_OVER = 16  # requests one round tries and passes over before it ends


class NewTokenRatio:
    """The share of running requests' remaining max_new_tokens reserved in admission:
    decays while decoding goes well, jumps back up after a retraction."""

    def __init__(self, schedule_conservativeness: float):
        self.initial = min(0.7 * schedule_conservativeness, 1.0)
        self.value = self.initial

    def decay(self) -> None:
        """One decode step went by without a retraction."""
        self.value = max(self.value - 0.001, 0.1 * self.initial)

    def reset(self) -> None:
        """A retraction: the estimate was too low."""
        self.value = self.initial


@dataclass(frozen=True)
class PrefillLimits:
    """What bounds one extend batch, settled once from the arguments and the model."""

    max_prefill_tokens: int
    chunk_size: int | None  # None: prompts are never split
    max_len: int  # no request holds more tokens: min(context length, KV pool)
    max_running_requests: int


@dataclass(frozen=True)
class PrefillPlan:
    """The next extend batch: its requests, each one's first position to run, the one
    left mid-prefill (its next chunk comes first next time), and the counters its newly
    admitted requests add to the scheduler's stats."""

    reqs: list[Req]
    starts: list[int]
    chunked: Req | None
    cache_hit_tokens: int
    prompt_tokens: int


class PrefillAdder:
    """Plans one extend batch over `running` (the requests decoding now, read only):
    takes KV for the requests it admits and returns them as a plan."""

    def __init__(
        self, limits: PrefillLimits, kv: KVOps, running: Sequence[Req], ratio: NewTokenRatio
    ):
        self.limits = limits
        self.kv = kv
        self.ratio = ratio
        limit, chunk = limits.max_prefill_tokens, limits.chunk_size
        self.token_budget = min(limit, chunk) if chunk else limit
        self.running_count = len(running)
        self.reqs: list[Req] = []
        self.starts: list[int] = []
        self.chunked: Req | None = None
        self.out_of_rows = False
        self.cache_hit_tokens = 0
        self.prompt_tokens = 0
        self.reserved = sum(self._future_tokens(r) for r in running)

    def _future_tokens(self, req: Req) -> int:
        remaining = min(
            req.sampling.max_new_tokens - len(req.output_ids), self.limits.max_len - req.seqlen
        )
        return int(max(remaining, 0) * self.ratio.value)

    @property
    def full(self) -> bool:
        """Whether no request at all can join this batch any more."""
        return (
            self.chunked is not None
            or self.token_budget <= 0
            or self.out_of_rows
            or self.running_count + len(self.reqs) >= self.limits.max_running_requests
            or self.kv.budget() - self.reserved < 1  # alone, any request has room
        )

    def plan(self) -> PrefillPlan:
        return PrefillPlan(
            self.reqs, self.starts, self.chunked, self.cache_hit_tokens, self.prompt_tokens
        )

    def add_from(self, queue: list[Req], aged: Callable[[Req], bool]) -> None:
        """Admit from `queue`, in its order, until the batch is full. A request that does
        not fit is passed over unless `aged(req)`: then the round ends at it (module doc)."""
        passed_over = 0
        for req in queue:
            if self.full or passed_over == MAX_PASSED_OVER:
                return
            if self.try_add(req):
                continue
            if aged(req):
                return
            passed_over += 1

    def continue_chunk(self, req: Req) -> bool:
        """The request mid-prefill gets its next chunk first. False when the pool cannot
        give it: the caller retracts it."""
        n = min(req.seqlen - req.kv_len, self.token_budget)
        start = req.kv_len
        if not self.kv.extend(req, n):
            return False
        self._admit(req, start, n)
        return True

    def try_add(self, req: Req) -> bool:
        """Admit req if the KV left takes it (call only while not `full`)."""
        self.kv.match(req)
        if not self.kv.start(req):
            self.out_of_rows = True
            return False
        prefix = req.kv_len
        n = req.seqlen - prefix
        future = self._future_tokens(req)
        if self.limits.chunk_size is not None and n > self.token_budget:
            n = self.token_budget
        # With nothing else in flight a request needs room for its prompt only: retraction
        # or the length limit handles the rest, and it must not wait forever.
        alone = not self.running_count and not self.reqs
        need = n if alone else n + future
        if need > self.kv.budget() - self.reserved or not self.kv.extend(req, n):
            self.kv.release(req, finished=False)
            return False
        self.reserved += future
        if req.retractions == 0 and not req.output_ids:
            req.cached_tokens = prefix
            self.cache_hit_tokens += prefix
            self.prompt_tokens += len(req.origin_input_ids)
            req.queue_time = time.monotonic() - req.queued_at
        self._admit(req, prefix, n)
        return True

    def _admit(self, req: Req, start: int, n: int) -> None:
        self.reqs.append(req)
        self.starts.append(start)
        self.token_budget -= n
        if req.kv_len < req.seqlen:
            self.chunked = req
