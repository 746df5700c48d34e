"""RoPE and the K/V store in one Triton kernel, for batches past small_batch's few rows.

After the qkv projection, the unfused path runs three kernels per layer: RoPE on q and k
in place, the indexed store of k and v into the KV pool, and a copy of q into the
contiguous layout the attention kernels read. This kernel reads each token's qkv row
once, rotates the q and k heads (rotate-half, in float32 as FlashInfer's RoPE does, then
rounded to the model's dtype), writes q out contiguous, and writes k and v to the pool row
of the token's slot. At decode batch 757 it saves ~0.5 ms of a 28 ms step (H100, Llama-3.1-8B;
see benchmarks/RESULTS.md).

`--disable-fused-kernels` turns it off with the other fused kernels.
"""

from __future__ import annotations

import torch

from loom.runtime.layers.switches import SWITCHES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the reference layers run
    triton = tl = None

_HEADS_BLOCK = 16  # heads per program: a program moves 16 heads x head_dim of one token


def available(qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether the model should call rope_store on this qkv output."""
    return (
        triton is not None
        and SWITCHES.fused
        and qkv.is_cuda
        and qkv.dtype in (torch.float16, torch.bfloat16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0  # tl.arange over half a head
    )


if triton is not None:

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr, qkv_stride, pos_ptr, loc_ptr, cs_ptr, cs_stride, q_ptr, q_stride, kv_ptr, kv_stride,
        NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (t, g): token t's heads g*HEADS_BLOCK...; q heads, then k, then v, as in
        the fused projection's output row."""
        HALF: tl.constexpr = HEAD_DIM // 2
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
        j = tl.arange(0, HALF)
        live = (heads < NUM_Q + 2 * NUM_KV)[:, None]
        src = qkv_ptr + t * qkv_stride + heads[:, None] * HEAD_DIM + j[None, :]
        a = tl.load(src, mask=live, other=0.0)
        b = tl.load(src + HALF, mask=live, other=0.0)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cs_ptr + pos * cs_stride + j)[None, :]
        sin = tl.load(cs_ptr + pos * cs_stride + HALF + j)[None, :]
        af, bf = a.to(tl.float32), b.to(tl.float32)
        rotates = (heads < NUM_Q + NUM_KV)[:, None]  # q and k heads; v heads pass through
        ra = tl.where(rotates, (af * cos - bf * sin).to(a.dtype), a)
        rb = tl.where(rotates, (bf * cos + af * sin).to(a.dtype), b)
        is_q = (heads < NUM_Q)[:, None]
        q_dst = q_ptr + t * q_stride + heads[:, None] * HEAD_DIM + j[None, :]
        tl.store(q_dst, ra, mask=is_q)
        tl.store(q_dst + HALF, rb, mask=is_q)
        loc = tl.load(loc_ptr + t).to(tl.int64)
        # The pool row is (2, NUM_KV, HEAD_DIM): k heads then v heads, as in the qkv row.
        kv_dst = kv_ptr + loc * kv_stride + (heads[:, None] - NUM_Q) * HEAD_DIM + j[None, :]
        kv = live & ~is_q
        tl.store(kv_dst, ra, mask=kv)
        tl.store(kv_dst + HALF, rb, mask=kv)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    kv_buffer: torch.Tensor,
    out_cache_loc: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """q (tokens, num_heads, head_dim), rotated; k (rotated) and v of each token stored at
    its slot in kv_buffer (slots, 2, num_kv_heads, head_dim). qkv: (tokens, (num_heads +
    2 * num_kv_heads) * head_dim), the fused projection's output. cos_sin: (positions,
    head_dim), the cosines of the rotate-half pairs, then their sines."""
    n, width = qkv.shape
    if width != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be (tokens, {(num_heads + 2 * num_kv_heads) * head_dim}) with "
            f"contiguous rows; got shape {tuple(qkv.shape)}, strides {qkv.stride()}"
        )
    if positions.shape != (n,) or out_cache_loc.shape != (n,):
        raise ValueError(f"positions and out_cache_loc must have one entry per token ({n})")
    if kv_buffer.dtype != qkv.dtype or kv_buffer.shape[1:] != (2, num_kv_heads, head_dim):
        raise ValueError(
            f"kv_buffer must be (slots, 2, {num_kv_heads}, {head_dim}) in {qkv.dtype}; "
            f"got {tuple(kv_buffer.shape)} in {kv_buffer.dtype}"
        )
    if not kv_buffer[0].is_contiguous() or cos_sin.shape[1] != head_dim:
        raise ValueError("kv_buffer rows must be contiguous and cos_sin (positions, head_dim)")
    q = qkv.new_empty(n, num_heads, head_dim)
    if n == 0:
        return q
    heads = num_heads + 2 * num_kv_heads
    grid = (n, triton.cdiv(heads, _HEADS_BLOCK))
    _rope_store_kernel[grid](
        qkv, qkv.stride(0), positions, out_cache_loc, cos_sin, cos_sin.stride(0),
        q, q.stride(0), kv_buffer, kv_buffer.stride(0),
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HEADS_BLOCK=_HEADS_BLOCK,
    )  # fmt: skip
    return q
