"""A request's KV life: match a cached prefix, lock it, allocate slots (evicting cache to
make room), hand finished tokens to the prefix cache, and free what is left.

Invariant: req_to_token[req.req_pool_idx, :req.kv_len] holds the request's KV slots; the
first len(req.prefix_indices) of them belong to the cache (locked through req.last_node),
the rest belong to the request until it is released.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loom.radix.base import PrefixCache
from loom.runtime.scheduler.request import Req

_EMPTY = torch.empty(0, dtype=torch.int64)


class KVOps:
    def __init__(self, runner, cache: PrefixCache):
        self.pool = runner.req_to_token_pool
        self.allocator = runner.allocator
        self.cache = cache
        self.evicted_tokens = 0

    def match(self, req: Req) -> None:
        """Set req.prefix_indices / last_node to the longest usable cached prefix."""
        limit = req.seqlen - 1  # at least one token must run to produce the next logits
        if req.return_logprob and req.logprob_start_len >= 0 and not req.output_ids:
            # Prompt logprobs from position p need the logits at p - 1 recomputed.
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        result = self.cache.match_prefix(req.fill_ids[:limit])
        req.prefix_indices, req.last_node = result.kv_indices, result.last_node

    def fits_alone(self, tokens: int) -> bool:
        """Whether a request of this many tokens fits the pool with nothing else in it."""
        return tokens <= self.allocator.size

    def full_message(self, tokens: int) -> str:
        return (
            f"the KV cache is full: it holds {self.allocator.size} tokens and this "
            f"request alone has {tokens}; ask for fewer max_new_tokens or start the "
            "server with a larger --max-total-tokens"
        )

    def budget(self) -> int:
        """Slots obtainable now: free ones plus unlocked cache that can be evicted."""
        return self.allocator.available() + self.cache.evictable_size()

    def alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available()
        if short > 0:
            self.evicted_tokens += self.cache.evict(short)
        return self.allocator.alloc(n)

    def start(self, req: Req) -> bool:
        """Give an admitted request a req_to_token row holding its (locked) cached prefix."""
        row = self.pool.alloc()
        if row is None:
            return False
        self.cache.lock(req.last_node)
        req.req_pool_idx = row
        self.pool.write(row, 0, req.prefix_indices)
        req.kv_len = len(req.prefix_indices)
        return True

    def extend(self, req: Req, n: int) -> bool:
        slots = self.alloc(n)
        if slots is None:
            return False
        self.pool.write(req.req_pool_idx, req.kv_len, slots)
        req.kv_len += n
        return True

    def cache_unfinished(self, req: Req) -> None:
        """After a prefill chunk: put its tokens in the cache so siblings share them now,
        and re-point the request at the cache's slots."""
        if not self.cache.shares_prefixes:
            return
        tokens = req.fill_ids[: req.kv_len]
        slots = self.pool.read(req.req_pool_idx, 0, req.kv_len)
        self._insert(tokens, slots, len(req.prefix_indices))
        result = self.cache.match_prefix(tokens)
        assert len(result.kv_indices) == req.kv_len, "inserted tokens must match in full"
        self.pool.write(req.req_pool_idx, 0, result.kv_indices)
        self.cache.lock(result.last_node)  # lock the new path before unlocking the old one
        self.cache.unlock(req.last_node)
        req.prefix_indices, req.last_node = result.kv_indices, result.last_node

    def release(self, req: Req, finished: bool) -> None:
        """Finished: the cache takes the request's tokens. Retracted: its own slots are
        freed. Either way the prefix lock and the req_to_token row are given back."""
        if req.req_pool_idx is None:
            return
        slots = self.pool.read(req.req_pool_idx, 0, req.kv_len)
        own = len(req.prefix_indices)
        if finished and self.cache.shares_prefixes:
            self._insert(req.fill_ids[: req.kv_len], slots, own)
        else:
            self.allocator.free(slots[own:])
        self.cache.unlock(req.last_node)
        self.pool.free(req.req_pool_idx)
        req.req_pool_idx, req.kv_len = None, 0
        req.prefix_indices, req.last_node = _EMPTY, None

    def truncate(self, req: Req, kv_len: int) -> None:
        """Forget the request's KV past kv_len (its own slots only)."""
        assert kv_len >= len(req.prefix_indices)
        if kv_len < req.kv_len:
            self.allocator.free(self.pool.read(req.req_pool_idx, kv_len, req.kv_len))
            req.kv_len = kv_len

    def _insert(self, tokens: list[int], slots: torch.Tensor, own_start: int) -> None:
        already = self.cache.insert(tokens, slots)
        # Tokens the request computed itself but the cache already had (another request
        # inserted them meanwhile): the cache keeps its copy, ours is freed.
        if already > own_start:
            self.allocator.free(slots[own_start:already])

    def alloc_decode_slots(
        self, running: list[Req], retract: Callable[[Req], None]
    ) -> torch.Tensor | None:
        """One slot per request of `running` (the caller's list of this step's decoders),
        retracting the least advanced ones when even eviction cannot make room. A victim
        leaves `running` here; `retract` takes it out of the scheduler's own lists."""
        while running:
            slots = self.alloc(len(running))
            if slots is not None:
                rows = [r.req_pool_idx for r in running]
                self.pool.write_positions(rows, [r.kv_len for r in running], slots)
                for req in running:
                    req.kv_len += 1
                return slots
            victim = min(running, key=lambda r: (len(r.output_ids), -r.arrival))
            running.remove(victim)
            retract(victim)
        return None
