"""The KV pool's store: K and V of a fused QKV output go in with one indexed store, any
other K / V with two; both leave the same values in the layer's buffer, and its k / v
views read back what was stored."""

from __future__ import annotations

import torch

from loom.runtime.memory.kv_pool import KVCachePool, _side_by_side

HEADS, KV_HEADS, DIM = 4, 2, 8


def qkv_views(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * DIM)
    q_end, k_end = HEADS * DIM, (HEADS + KV_HEADS) * DIM
    k = qkv[:, q_end:k_end].view(n, KV_HEADS, DIM)
    v = qkv[:, k_end:].view(n, KV_HEADS, DIM)
    return qkv, k, v


def test_fused_qkv_views_are_seen_side_by_side() -> None:
    _, k, v = qkv_views(5)
    kv = _side_by_side(k, v)
    assert kv is not None and kv.shape == (5, 2, KV_HEADS, DIM)
    assert torch.equal(kv[:, 0], k) and torch.equal(kv[:, 1], v)


def test_separate_or_reordered_tensors_are_not() -> None:
    _, k, v = qkv_views(5)
    assert _side_by_side(v, k) is None  # v before k
    assert _side_by_side(k.clone(), v.clone()) is None  # separate allocations
    assert _side_by_side(k, v.to(torch.float64)) is None


def test_store_writes_the_same_either_way() -> None:
    slots = torch.tensor([3, 1, 7])
    _, k, v = qkv_views(3)
    fused = KVCachePool(8, 2, KV_HEADS, DIM, torch.float32, "cpu")
    split = KVCachePool(8, 2, KV_HEADS, DIM, torch.float32, "cpu")
    fused.layer(1).store(slots, k, v)
    split.layer(1).store(slots, k.clone(), v.clone())
    for pool in (fused, split):
        assert torch.equal(pool.layer(1).k[slots], k)
        assert torch.equal(pool.layer(1).v[slots], v)
        assert not pool.layer(0).buffer.any()  # other layers untouched
        untouched = torch.ones(9, dtype=torch.bool)
        untouched[slots] = False
        assert not pool.layer(1).buffer[untouched].any()
    assert torch.equal(fused.layer(1).buffer, split.layer(1).buffer)


def test_store_casts_to_the_pool_dtype() -> None:
    _, k, v = qkv_views(2)
    pool = KVCachePool(4, 1, KV_HEADS, DIM, torch.bfloat16, "cpu")
    pool.layer(0).store(torch.tensor([1, 2]), k, v)
    assert torch.equal(pool.layer(0).k[1:3], k.to(torch.bfloat16))
    assert torch.equal(pool.layer(0).v[1:3], v.to(torch.bfloat16))
