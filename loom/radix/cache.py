"""The radix tree prefix cache: token-id prefixes -> the KV slots that hold them.

Each node is an edge of the tree: a run of token ids (its key) and the KV slots of those
tokens (its value). The path root..node spells a prefix; its slots are the concatenated
values along the path. Invariants (checked by `check_integrity`):

- every non-root node has a non-empty key, and len(key) == value.numel();
- a child is stored under the first token of its key, and siblings differ in that token;
- node.ref counts the locks whose path runs through node, so parent.ref >= the sum of
  its children's refs, and a node with ref > 0 is never evicted;
- a parent's last access is never older than a child's (every touch runs from the root),
  so evicting leaves in LRU order also frees parents before fresher subtrees;
- evictable_size / protected_size are the token counts in nodes with ref == 0 / ref > 0.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

import torch

from loom.radix.base import MatchResult, PrefixCache
from loom.runtime.memory.allocator import KVAllocator

_CHUNK = 64  # keys are compared a chunk at a time so the Python loop runs rarely


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two tuples (or two lists): slice comparisons
    (C speed) narrow it down to one chunk, then a short loop finds the first mismatch."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    start = 0
    while a[start : start + _CHUNK] == b[start : start + _CHUNK]:
        start += _CHUNK
    end = min(start + _CHUNK, n)
    for i in range(start, end):
        if a[i] != b[i]:
            return i
    return end


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "ref", "last_access")

    def __init__(self, key: tuple[int, ...], value: torch.Tensor, parent: TreeNode | None):
        self.key = key
        self.value = value  # int64 KV slots, one per token of key
        self.children: dict[int, TreeNode] = {}
        self.parent = parent  # None for the root and for evicted nodes
        self.ref = 0
        self.last_access = 0

    def __repr__(self) -> str:
        head = ",".join(map(str, self.key[:8])) + ("..." if len(self.key) > 8 else "")
        return f"TreeNode([{head}] len={len(self.key)} ref={self.ref} t={self.last_access})"


class RadixCache(PrefixCache):
    def __init__(self, allocator: KVAllocator):
        self.allocator = allocator
        self._clock = itertools.count(1)  # monotonic access time: LRU needs order only
        self._seq = itertools.count()  # heap tie-break, so nodes are never compared
        self.reset_tree()

    def reset_tree(self) -> None:
        """Forget every node without freeing slots (used by reset and construction)."""
        self.root = TreeNode((), self._empty(), None)
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # non-root nodes
        # Lazy LRU heap of (last_access, seq, node); an entry is stale when the node left
        # the tree, gained a child or a lock, or was touched since (see _is_evictable).
        self._heap: list[tuple[int, int, TreeNode]] = []

    # ---- queries -------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        key = tuple(token_ids)
        node, matched, values = self._descend(key, next(self._clock))
        if node is not self.root and not node.children:
            self._push(node)  # its access time changed: re-queue it for LRU
        kv = torch.cat(values) if values else self._empty()
        return MatchResult(kv, node)

    def insert(self, token_ids: Sequence[int], kv_indices: torch.Tensor) -> int:
        key = tuple(token_ids)
        assert kv_indices.numel() == len(key), "one KV slot per token"
        now = next(self._clock)
        node, matched, _ = self._descend(key, now)
        if matched < len(key):
            leaf = TreeNode(key[matched:], kv_indices[matched:].to(torch.int64), node)
            leaf.last_access = now
            node.children[key[matched]] = leaf
            self._evictable += len(leaf.key)
            self._num_nodes += 1
            node = leaf
        if node is not self.root and not node.children:
            self._push(node)
        return matched

    def _descend(self, key: tuple[int, ...], now: int) -> tuple[TreeNode, int, list]:
        """Walk down along key, splitting the last edge where the match ends inside it,
        and touch every node on the way. Returns (last node, tokens matched, values)."""
        node, pos, values = self.root, 0, []
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = common_prefix_len(child.key, key[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        return node, pos, values

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper part. The lower part
        keeps its identity, so handles held by requests (last_node) stay valid."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = TreeNode(child.key[:n], child.value[:n], parent)
        upper.ref = child.ref  # every lock through child also runs through upper
        upper.last_access = child.last_access
        upper.children[child.key[n]] = child
        parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        self._num_nodes += 1
        return upper

    # ---- locking -------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.parent is not None, f"lock of an evicted node {node}"
            if node.ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        bottom = node
        while node is not self.root:
            assert node.ref > 0, f"unlock without a lock: {node}"
            node.ref -= 1
            if node.ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            assert node.parent is not None
            node = node.parent
        if bottom is not self.root and bottom.ref == 0 and not bottom.children:
            self._push(bottom)

    # ---- eviction ------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._is_evictable(node, last_access):
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            node.parent = None
            freed.append(node.value)
            count += len(node.key)
            self._evictable -= len(node.key)
            self._num_nodes -= 1
            if parent is not self.root and parent.ref == 0 and not parent.children:
                self._push(parent)
        if freed:
            self.allocator.free(torch.cat(freed))
        return count

    def _push(self, node: TreeNode) -> None:
        if node.ref == 0:
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            self._maybe_compact_heap()

    def _is_evictable(self, node: TreeNode, last_access: int) -> bool:
        """A heap entry is live when its node is still an unlocked leaf in the tree and
        was not touched after the entry was pushed (a fresher entry exists then)."""
        return (
            node.parent is not None
            and node.ref == 0
            and not node.children
            and node.last_access == last_access
        )

    def _maybe_compact_heap(self) -> None:
        # Stale entries accumulate with touches; rebuilding once they outnumber the nodes
        # keeps the heap O(nodes), and costs amortized O(1) per push (after a rebuild it
        # holds one entry per evictable leaf, so the next one is >= nodes + 64 pushes away).
        if len(self._heap) > 2 * self._num_nodes + 64:
            leaves = (n for n in self._nodes() if n.ref == 0 and not n.children)
            self._heap = [(n.last_access, next(self._seq), n) for n in leaves]
            heapq.heapify(self._heap)

    # ---- sizes, reset, debugging ---------------------------------------------------

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def reset(self) -> None:
        assert self._protected == 0, "reset while requests still lock cached prefixes"
        values = [n.value for n in self._nodes()]
        if values:
            self.allocator.free(torch.cat(values))
        self.reset_tree()

    def _nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self) -> None:
        evictable = protected = count = 0
        slots: list[torch.Tensor] = []
        for node in self._nodes():
            parent = node.parent
            assert parent is not None and parent.children.get(node.key[0]) is node
            assert len(node.key) > 0, "empty non-root node"
            assert node.value.dim() == 1 and node.value.dtype == torch.int64
            assert node.value.numel() == len(node.key), f"key/value lengths differ: {node}"
            assert node.ref >= 0
            assert node.ref >= sum(c.ref for c in node.children.values()), node
            assert parent is self.root or parent.last_access >= node.last_access, node
            for first, child in node.children.items():
                assert child.key[0] == first
            if node.ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            count += 1
            slots.append(node.value)
        for first, child in self.root.children.items():
            assert child.key[0] == first
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes ({self._evictable}, {self._protected}) != recount ({evictable}, {protected})"
        )
        assert count == self._num_nodes
        if slots:
            all_slots = torch.cat(slots)
            assert all_slots.unique().numel() == all_slots.numel(), "a KV slot is cached twice"

    def pretty(self) -> str:
        lines: list[str] = []
        stack = [(c, 1) for c in reversed(self.root.children.values())]
        while stack:
            node, depth = stack.pop()
            lines.append("  " * depth + repr(node))
            stack.extend((c, depth + 1) for c in reversed(node.children.values()))
        head = f"RadixCache(evictable={self._evictable}, protected={self._protected})"
        return "\n".join([head, *lines])

    def __repr__(self) -> str:
        return (
            f"RadixCache(nodes={self._num_nodes}, evictable={self._evictable}, "
            f"protected={self._protected})"
        )

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.allocator.device)
