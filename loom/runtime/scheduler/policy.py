"""Which waiting requests the scheduler tries to admit this round, and in what order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from loom.radix.base import PrefixCache
from loom.runtime.scheduler.request import Req

POLICIES = ("lpm", "dfs-weight", "fcfs")


def _arrival(req: Req) -> int:
    return req.arrival


class SchedulePolicy:
    """Orders the waiting queue; the scheduler admits from the front while KV lasts.

    Policies:
    - "fcfs": arrival order; nothing is matched against the cache.
    - "lpm" (longest prefix match): the longest cached prefix first, ties by arrival, so
      requests are served while their prefix is still cached.
    - "dfs-weight": requests are hung on the cache node their match ended at; a depth-first
      walk from the root visits heavier subtrees (more waiting requests) first, ties by
      the earliest arrival in the subtree, and emits a node's own requests, in arrival
      order, after its subtrees (so deeper matches precede shallower ones and requests
      with no hit, on the root, come last). Requests sharing a prefix come out together
      while it is cached.

    Rules for lpm and dfs-weight (each round is one `order` call):
    1. A queue longer than `max_match_queue`, or a cache that shares nothing, is served
       FCFS: matching every waiting request each round would cost more than it saves.
    2. Aging: every call adds one to `wait_rounds` of each request it sees. Requests with
       `wait_rounds > max_wait_rounds` go first, in arrival order, and are never deferred,
       so cache-hit ordering cannot starve a request forever.
    3. In-batch prefix deferral: a request whose cached match is shorter than
       `defer_threshold` tokens but whose first `defer_threshold` tokens equal those of a
       request placed earlier this round is left out of this round (`deferrals += 1`):
       once the earlier one is prefilled and cached, it prefills only its own suffix.
       A request already deferred `max_deferrals` times is not deferred again.
    4. The first request is never deferred, so a non-empty queue yields a non-empty order.
    """

    def __init__(
        self,
        policy: str,
        tree_cache: PrefixCache,
        match_fn: Callable[[Req], None],
        *,
        max_match_queue: int = 128,
        defer_threshold: int = 32,
        max_deferrals: int = 2,
        max_wait_rounds: int = 64,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown schedule policy {policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self.tree_cache = tree_cache
        self.match_fn = match_fn  # sets req.prefix_indices and req.last_node
        self.max_match_queue = max_match_queue
        self.defer_threshold = defer_threshold
        self.max_deferrals = max_deferrals
        self.max_wait_rounds = max_wait_rounds

    def order(self, waiting: list[Req]) -> list[Req]:
        for req in waiting:
            req.wait_rounds += 1
        by_arrival = sorted(waiting, key=_arrival)
        if not self._uses_cache(len(waiting)):
            return by_arrival
        for req in by_arrival:
            self.match_fn(req)
        aged = [r for r in by_arrival if r.wait_rounds > self.max_wait_rounds]
        fresh = [r for r in by_arrival if r.wait_rounds <= self.max_wait_rounds]
        ranked = lpm_order(fresh) if self.policy == "lpm" else dfs_weight_order(fresh)
        return self._defer_shared_prefixes(aged, ranked)

    def aged(self, req: Req) -> bool:
        """Whether req has waited past the starvation bound (rule 2); admission then stops
        passing it over (admission.py)."""
        return req.wait_rounds > self.max_wait_rounds

    def _uses_cache(self, queue_len: int) -> bool:
        return (
            self.policy != "fcfs"
            and self.tree_cache.shares_prefixes
            and queue_len <= self.max_match_queue
        )

    def _defer_shared_prefixes(self, aged: list[Req], ranked: list[Req]) -> list[Req]:
        # Two requests share >= t leading tokens iff their first t tokens are equal, so a
        # set of t-token heads of the placed requests is all the in-batch "trie" needed.
        t = self.defer_threshold
        heads: set[tuple[int, ...]] = set()
        placed: list[Req] = []
        for req in aged + ranked:
            ids = req.fill_ids
            head = tuple(ids[:t]) if len(ids) >= t else None
            if head is not None and head in heads and self._may_defer(req):
                req.deferrals += 1
                continue
            placed.append(req)
            if head is not None:
                heads.add(head)
        return placed

    def _may_defer(self, req: Req) -> bool:
        return (
            len(req.prefix_indices) < self.defer_threshold
            and req.deferrals < self.max_deferrals
            and req.wait_rounds <= self.max_wait_rounds  # aged requests are never deferred
        )


def lpm_order(reqs: list[Req]) -> list[Req]:
    """Longest cached prefix first; ties by arrival."""
    return sorted(reqs, key=lambda r: (-len(r.prefix_indices), r.arrival))


def dfs_weight_order(reqs: list[Req]) -> list[Req]:
    """Depth-first over the cache nodes the requests matched to, heaviest subtree first,
    a node's own requests after its subtrees.

    The walk runs over a virtual root (None) above every node without a parent, so any
    cache whose nodes expose `.parent` works (the ChunkCache root included)."""
    attached: dict[Any, list[Req]] = defaultdict(list)
    weight: dict[Any, int] = defaultdict(int)
    first_arrival: dict[Any, int] = {}
    children: dict[Any, dict[Any, None]] = defaultdict(dict)  # dict: an ordered set
    for req in sorted(reqs, key=_arrival):
        node = req.last_node
        attached[node].append(req)
        while node is not None:
            parent = getattr(node, "parent", None)
            children[parent][node] = None
            weight[node] += 1
            first_arrival.setdefault(node, req.arrival)  # arrival order: first is earliest
            node = parent

    ordered: list[Req] = []
    stack: list[tuple[Any, bool]] = [(None, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            ordered.extend(attached.get(node, ()))
            continue
        stack.append((node, True))
        kids = sorted(children.get(node, ()), key=lambda c: (-weight[c], first_arrival[c]))
        stack.extend((kid, False) for kid in reversed(kids))
    return ordered
