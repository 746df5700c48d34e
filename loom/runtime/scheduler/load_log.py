"""The scheduler's periodic load line, at info, while it has work:

    load: 3 running, 5 waiting, KV 12.5% (4096/32768 tokens), cache hits 40.0%,
    1200.0 prompt + 350.5 generation tokens/s

Rates and the hit rate are over the interval since the last line, so a line says what the
server did lately, not since it started (/metrics has the totals). An idle scheduler logs
nothing."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from loom.runtime.messages import ServerInfo

if TYPE_CHECKING:
    from loom.runtime.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


class LoadLog:
    def __init__(self, interval: float):
        self.interval = interval  # seconds; 0: no lines
        self.since = time.monotonic()
        self.last: ServerInfo | None = None  # the counters at the start of the interval

    def tick(self, sched: Scheduler) -> None:
        """Once per turn of the scheduler loop: a line when an interval with work ended."""
        now = time.monotonic()
        if not self.interval or now - self.since < self.interval:
            return
        info = sched.server_info()
        if self.last is not None and (sched.has_work() or _moved(self.last, info)):
            logger.info("load: %s", describe(self.last, info, now - self.since))
        self.last, self.since = info, now


def describe(before: ServerInfo, now: ServerInfo, seconds: float) -> str:
    prompt = now.prompt_tokens_total - before.prompt_tokens_total
    generated = now.generation_tokens_total - before.generation_tokens_total
    hits = now.cache_hit_tokens - before.cache_hit_tokens
    retracted = now.retractions_total - before.retractions_total
    used, total = now.tokens_in_use, now.max_total_tokens
    line = (
        f"{now.running_requests} running, {now.waiting_requests} waiting, "
        f"KV {100 * used / total:.1f}% ({used}/{total} tokens), "
        f"cache hits {100 * hits / prompt if prompt else 0:.1f}%, "
        f"{prompt / seconds:.1f} prompt + {generated / seconds:.1f} generation tokens/s"
    )
    return line + (f", {retracted} retracted" if retracted else "")


def _moved(before: ServerInfo, now: ServerInfo) -> bool:
    return (
        now.prompt_tokens_total != before.prompt_tokens_total
        or now.generation_tokens_total != before.generation_tokens_total
    )
