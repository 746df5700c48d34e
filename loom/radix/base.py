"""The prefix-cache interface the scheduler talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class MatchResult(NamedTuple):
    kv_indices: torch.Tensor  # int64 KV slots of the matched prefix, in token order
    last_node: Any  # handle for lock / unlock; the root when nothing matched


class PrefixCache(ABC):
    """Maps token-id prefixes to the KV slots that hold them.

    Slots handed to `insert` belong to the cache afterwards; the cache frees them to the
    allocator when it evicts them. A path locked by `lock` is never evicted.
    """

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """The longest cached prefix of token_ids (touches LRU time along the path)."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], kv_indices: torch.Tensor) -> int:
        """Insert; returns how many leading tokens were already cached. The caller frees
        its own slots for those tokens (the cache keeps the ones it had)."""

    @abstractmethod
    def lock(self, node: Any) -> None:
        """Protect the path root..node from eviction (reference counted)."""

    @abstractmethod
    def unlock(self, node: Any) -> None:
        """Undo one lock of the path root..node."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens unlocked tokens (LRU leaves first) if possible;
        returns how many were freed."""

    @abstractmethod
    def evictable_size(self) -> int: ...

    @abstractmethod
    def protected_size(self) -> int: ...

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()

    @abstractmethod
    def reset(self) -> None:
        """Drop everything (all slots freed); only valid when nothing is locked."""

    def check_integrity(self) -> None:
        """Raise AssertionError if internal invariants do not hold (used by tests)."""

    @property
    def shares_prefixes(self) -> bool:
        return True
