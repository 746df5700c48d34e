"""RadixCache against a naive model: a dict from every cached token prefix to the KV slot of
its last token, plus the access time of each prefix for the LRU order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from loom.radix.cache import RadixCache, TreeNode, common_prefix_len
from loom.radix.chunk_cache import ChunkCache
from loom.runtime.memory.allocator import KVAllocator

POOL = 256
ALPHABET = (0, 1, 2)  # tiny, so prefixes collide and edges split often
SEQS = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=10).map(tuple)

Prefix = tuple[int, ...]


def cache_contents(cache: RadixCache) -> dict[Prefix, int]:
    """Every token prefix the tree holds -> the slot of its last token."""
    out: dict[Prefix, int] = {}
    stack: list[tuple[Prefix, TreeNode]] = [((), cache.root)]
    while stack:
        prefix, node = stack.pop()
        for child in node.children.values():
            path = prefix + child.key
            for i, slot in enumerate(child.value.tolist()):
                out[path[: len(prefix) + i + 1]] = slot
            stack.append((path, child))
    return out


def path_tokens(node: TreeNode) -> Prefix:
    keys = []
    while node.parent is not None:
        keys.append(node.key)
        node = node.parent
    return tuple(t for key in reversed(keys) for t in key)


def free_slots(allocator: KVAllocator) -> list[int]:
    return allocator._stack[: allocator._top].tolist()


class RadixMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator = KVAllocator(POOL, "cpu")
        self.cache = RadixCache(self.allocator)
        self.ref: dict[Prefix, int] = {}
        self.touched: dict[Prefix, int] = {}  # prefix -> the step that last touched it
        self.clock = 0
        self.inserted: list[Prefix] = []
        self.locks: list[tuple[TreeNode, Prefix]] = []

    # ---- the reference model -------------------------------------------------------

    def cached_len(self, seq: Prefix) -> int:
        n = 0
        while n < len(seq) and seq[: n + 1] in self.ref:
            n += 1
        return n

    def touch(self, seq: Prefix, n: int) -> None:
        self.clock += 1
        for i in range(1, n + 1):
            self.touched[seq[:i]] = self.clock

    def locked_prefixes(self) -> set[Prefix]:
        return {seq[:i] for _, seq in self.locks for i in range(1, len(seq) + 1)}

    def draw_query(self, data: st.DataObject) -> Prefix:
        """A random sequence, or a cut or extension of an inserted one (splits edges)."""
        if not self.inserted or data.draw(st.booleans()):
            return data.draw(SEQS)
        seq = data.draw(st.sampled_from(self.inserted))
        cut = data.draw(st.integers(1, len(seq)))
        return seq[:cut] + data.draw(st.lists(st.sampled_from(ALPHABET), max_size=3).map(tuple))

    def checked_match(self, seq: Prefix) -> tuple[TreeNode, int]:
        n = self.cached_len(seq)
        result = self.cache.match_prefix(seq)
        assert result.kv_indices.dtype == torch.int64
        assert result.kv_indices.tolist() == [self.ref[seq[: i + 1]] for i in range(n)]
        assert path_tokens(result.last_node) == seq[:n]
        self.touch(seq, n)
        return result.last_node, n

    # ---- rules ---------------------------------------------------------------------

    @rule(seq=SEQS)
    def insert(self, seq: Prefix) -> None:
        slots = self.allocator.alloc(len(seq))
        if slots is None:
            return  # pool full: evict or reset make room again
        expected = self.cached_len(seq)
        assert self.cache.insert(seq, slots) == expected
        self.allocator.free(slots[:expected])  # the tree kept its own slots for these
        for i in range(expected, len(seq)):
            self.ref[seq[: i + 1]] = int(slots[i])
        self.touch(seq, len(seq))
        self.inserted.append(seq)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self.checked_match(self.draw_query(data))

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        seq = self.draw_query(data)
        node, n = self.checked_match(seq)
        self.cache.lock(node)
        self.locks.append((node, seq[:n]))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.unlock(node)

    @rule(num_tokens=st.integers(0, 40))
    def evict(self, num_tokens: int) -> None:
        evictable = self.cache.evictable_size()
        freed = self.cache.evict(num_tokens)
        assert freed <= evictable
        assert freed >= num_tokens if num_tokens <= evictable else freed == evictable
        after = cache_contents(self.cache)
        removed = self.ref.keys() - after.keys()
        assert all(self.ref[p] == slot for p, slot in after.items()), "eviction moved slots"
        assert len(removed) == freed
        self.check_lru(removed, after)
        self.ref = after
        for _, seq in self.locks:  # a locked path is never evicted
            assert self.checked_match(seq)[1] == len(seq)

    def check_lru(self, removed: set[Prefix], after: dict[Prefix, int]) -> None:
        """Nothing evicted was touched later than any unlocked leaf that stayed."""
        locked = self.locked_prefixes()
        leaves = [
            p for p in after if p not in locked and not any(p + (t,) in after for t in ALPHABET)
        ]
        if removed and leaves:
            assert max(self.touched[p] for p in removed) <= min(self.touched[p] for p in leaves)

    @precondition(lambda self: not self.locks)
    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.ref.clear()
        assert self.allocator.available() == POOL

    # ---- invariants ----------------------------------------------------------------

    @invariant()
    def tree_matches_reference(self) -> None:
        self.cache.check_integrity()
        assert cache_contents(self.cache) == self.ref
        locked = self.locked_prefixes()
        assert locked <= self.ref.keys()
        assert self.cache.protected_size() == len(locked)
        assert self.cache.evictable_size() == len(self.ref) - len(locked)

    @invariant()
    def every_slot_is_free_or_cached_once(self) -> None:
        owned = free_slots(self.allocator) + list(self.ref.values())
        assert sorted(owned) == list(range(1, POOL + 1))


TestRadixCacheMachine = RadixMachine.TestCase
TestRadixCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- plain unit tests ----------------------------------------------------------------


@pytest.fixture
def allocator() -> KVAllocator:
    return KVAllocator(64, "cpu")


def insert_fresh(cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    slots = cache.allocator.alloc(len(tokens))
    assert slots is not None
    cached = cache.insert(tokens, slots)
    cache.allocator.free(slots[:cached])
    return slots


@given(st.lists(st.integers(0, 1), max_size=300), st.lists(st.integers(0, 1), max_size=300))
def test_common_prefix_len_agrees_with_a_loop(a: list[int], b: list[int]) -> None:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix_len(tuple(a), tuple(b)) == n


def test_match_ending_inside_an_edge_splits_it(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    slots = insert_fresh(cache, [1, 2, 3, 4])
    result = cache.match_prefix([1, 2, 9])
    assert result.kv_indices.tolist() == slots[:2].tolist()
    assert result.last_node.key == (1, 2)
    assert [c.key for c in result.last_node.children.values()] == [(3, 4)]
    cache.check_integrity()


def test_split_keeps_a_locked_handle_valid(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    insert_fresh(cache, [1, 2, 3, 4])
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.lock(node)
    cache.match_prefix([1, 2])  # splits the locked edge above node
    assert cache.protected_size() == 4 and cache.evictable_size() == 0
    cache.unlock(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 4
    cache.check_integrity()


def test_insert_returns_the_cached_length_and_keeps_old_slots(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    first = insert_fresh(cache, [1, 2, 3])
    assert cache.insert([1, 2, 3, 4, 5], torch.tensor([40, 41, 42, 43, 44])) == 3
    assert cache.insert([1, 2], torch.tensor([50, 51])) == 2
    assert cache.insert([7], torch.tensor([60])) == 0
    assert cache.match_prefix([1, 2, 3, 4, 5]).kv_indices.tolist() == first.tolist() + [43, 44]


def test_empty_match_returns_root_and_empty_tensor(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    result = cache.match_prefix([5, 6])
    assert result.kv_indices.numel() == 0 and result.kv_indices.dtype == torch.int64
    assert result.last_node is cache.root


def test_evict_frees_least_recently_used_leaf_first(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    for seq in ([1, 1], [2, 2], [3, 3]):
        insert_fresh(cache, seq)
    cache.match_prefix([1, 1])  # now [2, 2] is the least recently used
    before = allocator.available()
    assert cache.evict(2) == 2
    assert allocator.available() == before + 2
    assert len(cache.match_prefix([2, 2]).kv_indices) == 0
    assert len(cache.match_prefix([1, 1]).kv_indices) == 2
    assert len(cache.match_prefix([3, 3]).kv_indices) == 2


def test_evict_reaches_parents_once_their_children_are_gone(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    insert_fresh(cache, [1, 2, 3])
    insert_fresh(cache, [1, 2, 4])
    assert cache.evict(100) == 4
    assert cache.total_size() == 0 and allocator.available() == 64
    cache.check_integrity()


def test_evict_never_frees_a_locked_path(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    insert_fresh(cache, [1, 2, 3])
    insert_fresh(cache, [1, 2, 5, 6])
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.lock(node)
    assert cache.evict(100) == 2  # only the unlocked branch [5, 6]
    assert len(cache.match_prefix([1, 2, 3]).kv_indices) == 3
    cache.unlock(node)
    assert cache.evict(100) == 3


def test_unlock_without_lock_is_an_error(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    insert_fresh(cache, [1, 2])
    with pytest.raises(AssertionError):
        cache.unlock(cache.match_prefix([1, 2]).last_node)


def test_reset_frees_every_slot(allocator: KVAllocator) -> None:
    cache = RadixCache(allocator)
    insert_fresh(cache, [1, 2, 3])
    insert_fresh(cache, [4, 5])
    cache.reset()
    assert allocator.available() == 64 and cache.total_size() == 0
    assert len(cache.match_prefix([1, 2, 3]).kv_indices) == 0


def test_chunk_cache_shares_nothing_and_frees_on_insert(allocator: KVAllocator) -> None:
    cache = ChunkCache(allocator)
    slots = allocator.alloc(5)
    assert slots is not None
    assert cache.insert([1, 2, 3, 4, 5], slots) == 0
    assert allocator.available() == 64
    result = cache.match_prefix([1, 2, 3])
    assert result.kv_indices.numel() == 0 and result.last_node is cache.root
    assert not cache.shares_prefixes and cache.total_size() == 0
