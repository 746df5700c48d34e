"""What the scheduler reports about itself: /server_info, /metrics, the Engine's
get_server_info."""

from __future__ import annotations

from collections.abc import Mapping

from loom.runtime import messages as m
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.scheduler.jump_forward import JumpForward
from loom.runtime.scheduler.kv_ops import KVOps


def server_info(
    runner: ModelRunner,
    kv: KVOps,
    stats: Mapping[str, int],
    jump: JumpForward | None,
    running: int,
    waiting: int,
) -> m.ServerInfo:
    """The report from its parts: the model and pool (`runner`), the KV (`kv`), the
    scheduler's counters (`stats`, parts.STATS), jump-forward's counters, and how many
    requests run (prefilling ones included) and wait (for their grammar too)."""
    return m.ServerInfo(
        max_total_tokens=runner.max_total_tokens,
        available_tokens=runner.allocator.available(),
        cache_tokens=kv.cache.total_size(),
        evictable_tokens=kv.cache.evictable_size(),
        running_requests=running,
        waiting_requests=waiting,
        context_length=runner.context_len,
        max_running_requests=runner.max_running_requests,
        vocab_size=runner.vocab_size,
        cache_hit_tokens=stats["cache_hit_tokens"],
        prompt_tokens_total=stats["prompt_tokens"],
        generation_tokens_total=stats["generation_tokens"],
        retractions_total=stats["retractions"],
        evicted_tokens_total=kv.evicted_tokens,
        forward_steps_total=stats["forward_steps"],
        jump_forward_draft_tokens_total=jump.drafted_tokens if jump else 0,
        jump_forward_tokens_total=jump.accepted_tokens if jump else 0,
    )
