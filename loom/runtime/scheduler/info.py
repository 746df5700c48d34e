"""What the scheduler reports about itself: /server_info, /metrics, the Engine's
get_server_info."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime import messages as m

if TYPE_CHECKING:
    from loom.runtime.scheduler.scheduler import Scheduler


def server_info(sched: Scheduler) -> m.ServerInfo:
    cache = sched.kv.cache
    return m.ServerInfo(
        max_total_tokens=sched.runner.max_total_tokens,
        available_tokens=sched.runner.allocator.available(),
        cache_tokens=cache.total_size(),
        evictable_tokens=cache.evictable_size(),
        running_requests=len(sched.running) + (1 if sched.chunked else 0),
        waiting_requests=len(sched.waiting) + len(sched.grammar_wait),
        context_length=sched.runner.context_len,
        max_running_requests=sched.runner.max_running_requests,
        vocab_size=sched.runner.vocab_size,
        cache_hit_tokens=sched.stats["cache_hit_tokens"],
        prompt_tokens_total=sched.stats["prompt_tokens"],
        generation_tokens_total=sched.stats["generation_tokens"],
        retractions_total=sched.stats["retractions"],
        evicted_tokens_total=sched.kv.evicted_tokens,
        forward_steps_total=sched.stats["forward_steps"],
        jump_forward_draft_tokens_total=sched.jump.drafted_tokens if sched.jump else 0,
        jump_forward_tokens_total=sched.jump.accepted_tokens if sched.jump else 0,
    )
