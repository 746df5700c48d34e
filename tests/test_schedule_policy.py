"""SchedulePolicy: the order each policy picks on constructed prompt trees, and the bounds
on how long deferral and cache-hit ordering can hold a request back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.radix.base import PrefixCache
from loom.radix.cache import RadixCache
from loom.radix.chunk_cache import ChunkCache
from loom.runtime.memory.allocator import KVAllocator
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler.policy import SchedulePolicy
from loom.runtime.scheduler.request import Req


def toks(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def make_req(tokens: list[int], rid: str) -> Req:
    return Req(rid=rid, origin_input_ids=list(tokens), sampling=SamplingParams())


def seed(cache: RadixCache, tokens: list[int]) -> None:
    """Put tokens in the cache as a finished request would."""
    slots = cache.allocator.alloc(len(tokens))
    assert slots is not None
    cache.allocator.free(slots[: cache.insert(tokens, slots)])


class Matcher:
    """The scheduler's match_fn: a cache match that also counts its calls."""

    def __init__(self, cache: PrefixCache):
        self.cache = cache
        self.calls = 0

    def __call__(self, req: Req) -> None:
        self.calls += 1
        result = self.cache.match_prefix(req.fill_ids)
        req.prefix_indices, req.last_node = result.kv_indices, result.last_node


@pytest.fixture
def cache() -> RadixCache:
    return RadixCache(KVAllocator(4096, "cpu"))


def policy(name: str, cache: PrefixCache, **tunables: int) -> SchedulePolicy:
    return SchedulePolicy(name, cache, Matcher(cache), **tunables)


def rids(reqs: list[Req]) -> list[str]:
    return [r.rid for r in reqs]


def test_fcfs_is_arrival_order_without_matching(cache: RadixCache) -> None:
    seed(cache, toks(1000, 20))
    r0, r1, r2 = (make_req(t, f"r{i}") for i, t in enumerate([[1], toks(1000, 20), [2]]))
    fcfs = policy("fcfs", cache)
    assert rids(fcfs.order([r2, r1, r0])) == ["r0", "r1", "r2"]
    assert fcfs.match_fn.calls == 0  # type: ignore[attr-defined]


def test_lpm_puts_longest_cached_prefix_first_ties_by_arrival(cache: RadixCache) -> None:
    a, b = toks(1000, 20), toks(2000, 10)
    seed(cache, a)
    seed(cache, b)
    r0 = make_req(toks(3000, 5), "r0")  # no hit
    r1 = make_req(b + [7], "r1")  # 10 cached
    r2 = make_req(a + [8], "r2")  # 20 cached
    r3 = make_req(a[:15] + [9], "r3")  # 15 cached
    r4 = make_req(a + [5], "r4")  # 20 cached, arrived after r2
    order = policy("lpm", cache).order([r3, r0, r4, r1, r2])
    assert rids(order) == ["r2", "r4", "r3", "r1", "r0"]


def test_dfs_weight_walks_the_heavier_subtree_first(cache: RadixCache) -> None:
    # Cache: root -> a -> {a+x, a+y}, and root -> b.
    a, x, y, b = toks(1000, 8), toks(1100, 4), toks(1200, 4), toks(2000, 8)
    for prompt in (a + x, a + y, b):
        seed(cache, prompt)
    waiting = [
        make_req(b + [1], "r0"),  # on b: its subtree weighs 1
        make_req(a + x + [2], "r1"),  # on a+x: weight 1
        make_req(a + y + [3], "r2"),  # on a+y: weight 2 (with r4)
        make_req(a + [4], "r3"),  # on a itself: a's subtree weighs 4
        make_req(a + y + [5], "r4"),
        make_req(toks(5000, 3), "r5"),  # no hit: on the root, emitted last
    ]
    order = policy("dfs-weight", cache).order(waiting[::-1])
    assert rids(order) == ["r2", "r4", "r1", "r3", "r0", "r5"]


def test_dfs_weight_breaks_weight_ties_by_earliest_arrival(cache: RadixCache) -> None:
    b, c = toks(2000, 8), toks(3000, 8)
    seed(cache, b)
    seed(cache, c)
    r0 = make_req(c + [1], "r0")
    r1 = make_req(b + [2], "r1")
    r2 = make_req(b + [3], "r2")
    r3 = make_req(c + [4], "r3")
    assert rids(policy("dfs-weight", cache).order([r3, r2, r1, r0])) == ["r0", "r3", "r1", "r2"]


@pytest.mark.parametrize("name", ["lpm", "dfs-weight"])
def test_long_queue_falls_back_to_fcfs(cache: RadixCache, name: str) -> None:
    seed(cache, toks(1000, 20))
    waiting = [make_req([i], f"r{i}") for i in range(128)]
    waiting.append(make_req(toks(1000, 20), "hit"))
    pol = policy(name, cache)
    assert pol.order(waiting) == waiting  # 129 > 128: arrival order, nothing matched
    assert pol.match_fn.calls == 0  # type: ignore[attr-defined]
    assert pol.order(waiting[1:])[0].rid == "hit"  # 128 requests: matched again


@pytest.mark.parametrize("name", ["lpm", "dfs-weight"])
def test_a_cache_that_shares_nothing_is_served_fcfs(name: str) -> None:
    cache = ChunkCache(KVAllocator(64, "cpu"))
    waiting = [make_req(toks(100, 40), "r0"), make_req(toks(100, 40), "r1")]
    assert rids(policy(name, cache).order(waiting[::-1])) == ["r0", "r1"]


@pytest.mark.parametrize("name", ["lpm", "dfs-weight"])
def test_request_sharing_an_uncached_prefix_is_deferred_until_the_bound(
    cache: RadixCache, name: str
) -> None:
    shared = toks(100, 40)
    r0 = make_req(shared + [1], "r0")
    r1 = make_req(shared + [2], "r1")  # shares 40 >= 32 uncached tokens with r0
    r2 = make_req(toks(500, 40), "r2")
    pol = policy(name, cache, max_deferrals=2)
    assert rids(pol.order([r0, r1, r2])) == ["r0", "r2"]
    assert rids(pol.order([r0, r1, r2])) == ["r0", "r2"]
    assert r1.deferrals == 2
    assert "r1" in rids(pol.order([r0, r1, r2]))  # deferred max_deferrals times: admitted
    assert r1.deferrals == 2


def test_deferred_request_is_admitted_once_the_prefix_is_cached(cache: RadixCache) -> None:
    shared = toks(100, 40)
    r0 = make_req(shared + [1], "r0")
    r1 = make_req(shared + [2], "r1")
    pol = policy("lpm", cache)
    assert rids(pol.order([r0, r1])) == ["r0"]
    seed(cache, r0.fill_ids)  # r0 was prefilled and its prompt cached
    assert rids(pol.order([r1])) == ["r1"]
    assert r1.deferrals == 1 and len(r1.prefix_indices) == 40


def test_a_shared_prefix_below_the_threshold_is_not_deferred(cache: RadixCache) -> None:
    r0 = make_req(toks(100, 31) + [1], "r0")
    r1 = make_req(toks(100, 31) + [2], "r1")  # shares 31 < 32 tokens
    assert rids(policy("lpm", cache).order([r0, r1])) == ["r0", "r1"]
    assert r1.deferrals == 0


def test_a_request_with_a_long_cached_match_is_not_deferred(cache: RadixCache) -> None:
    shared = toks(100, 40)
    seed(cache, shared)
    r0 = make_req(shared + toks(200, 40), "r0")
    r1 = make_req(shared + toks(200, 40) + [1], "r1")  # shares 80, but 40 are cached
    assert rids(policy("lpm", cache).order([r0, r1])) == ["r0", "r1"]


def test_requests_waiting_too_long_go_first_in_arrival_order(cache: RadixCache) -> None:
    hit = toks(1000, 10)
    seed(cache, hit)
    old = make_req(toks(3000, 5), "old")  # no hit: LPM alone would keep it last
    pol = policy("lpm", cache, max_wait_rounds=2)
    for round_ in range(1, 4):
        newcomer = make_req(hit + [round_], f"new{round_}")
        order = pol.order([old, newcomer])
        assert old.wait_rounds == round_ and newcomer.wait_rounds == 1
        expected = ["new3", "old"] if round_ < 3 else ["old", "new3"]
        assert rids(order) == [e.replace("3", str(round_)) for e in expected]


def test_aged_requests_are_never_deferred(cache: RadixCache) -> None:
    shared = toks(100, 40)
    r0 = make_req(shared + [1], "r0")
    r1 = make_req(shared + [2], "r1")
    r0.wait_rounds = r1.wait_rounds = 10
    assert rids(policy("lpm", cache, max_wait_rounds=5).order([r1, r0])) == ["r0", "r1"]
    assert r1.deferrals == 0


def test_unknown_policy_is_rejected(cache: RadixCache) -> None:
    with pytest.raises(ValueError, match="lpm"):
        policy("random", cache)


PROMPTS = st.lists(st.integers(0, 2), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["lpm", "dfs-weight", "fcfs"]),
    cached=st.lists(PROMPTS, max_size=4),
    prompts=st.lists(PROMPTS, min_size=1, max_size=12),
)
def test_order_is_a_nonempty_subset_and_the_rest_were_deferred(
    name: str, cached: list[list[int]], prompts: list[list[int]]
) -> None:
    cache = RadixCache(KVAllocator(1024, "cpu"))
    for prompt in cached:
        seed(cache, prompt)
    waiting = [make_req(p, f"r{i}") for i, p in enumerate(prompts)]
    order = policy(name, cache, defer_threshold=4).order(waiting)
    assert order and len(set(map(id, order))) == len(order)
    left_out = [r for r in waiting if r not in order]
    assert all(r.deferrals == 1 for r in left_out)
    assert all(r.deferrals == 0 for r in order)
    cache.check_integrity()
