"""A prefix cache that shares nothing (`--disable-radix-cache`): every request prefills
its whole prompt, and finished requests' slots go straight back to the allocator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loom.radix.base import MatchResult, PrefixCache
from loom.runtime.memory.allocator import KVAllocator


class _Root:
    """The node every match returns; it has no parent and locking it does nothing."""

    parent = None

    def __repr__(self) -> str:
        return "ChunkCache.root"


class ChunkCache(PrefixCache):
    def __init__(self, allocator: KVAllocator):
        self.allocator = allocator
        self.root = _Root()

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        empty = torch.empty(0, dtype=torch.int64, device=self.allocator.device)
        return MatchResult(empty, self.root)

    def insert(self, token_ids: Sequence[int], kv_indices: torch.Tensor) -> int:
        # Nothing is ever cached, so the cache owns every slot and frees them at once.
        self.allocator.free(kv_indices)
        return 0

    def lock(self, node: Any) -> None:
        pass

    def unlock(self, node: Any) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    @property
    def shares_prefixes(self) -> bool:
        return False
