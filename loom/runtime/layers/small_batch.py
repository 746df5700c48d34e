"""Triton kernels for decoding a batch of a few rows, where a step is one read of the
weights and every extra kernel launch is time the weights are not streaming. They take up
to MAX_ROWS rows; the model calls them up to DECODE_ROWS, where they beat cuBLAS.

Three matrix-vector kernels cover a Llama layer, each fusing the small ops around it:
  qkv_rope_store  rmsnorm(residual) @ Wqkv, RoPE on q and k, k and v written to the KV pool
  gemv            x @ W (+ bias), optionally added into the residual stream in place
  gemv_silu_mul   rmsnorm(residual) @ Wgate_up, then silu(gate) * up
Attention runs between the first two (the backend's decode), so a layer is five kernels
instead of eleven.

Rounding follows the unfused path: each product is rounded to the model's dtype before the
op that consumes it (RoPE, SiLU, the residual add), which works in float32 as FlashInfer's
kernels do. Summation order differs from cuBLAS, as between any two GEMM kernels.

On Hopper they launch with programmatic dependent launch: a kernel fetches its first
weight chunk while the one before it finishes. `--disable-pdl` launches them plainly;
`--disable-small-batch-kernels` turns them off (cuBLAS and FlashInfer's kernels run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from loom.runtime.layers.switches import SWITCHES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the reference layers run
    triton = tl = None

MAX_ROWS = 8  # the kernels' limit (tested); larger batches are matrix products: cuBLAS
# The model takes them for decode batches up to this size. At 4-8 rows cuBLAS's GEMM beats
# these row-by-row reductions (benchmarks/bench_small_batch.py on an H100).
DECODE_ROWS = 2


def available(x: torch.Tensor) -> bool:
    """Whether the model should call these kernels on x (the tests also run them on CPU,
    through Triton's interpreter)."""
    return (
        triton is not None
        and SWITCHES.small_batch
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
    )


@dataclass(frozen=True)
class Config:
    block_n: int  # output rows per program (paired kernels: both halves together)
    block_k: int  # reduction chunk per loop step
    num_warps: int = 4
    num_stages: int = 1


def default_config(n: int, k: int, rows: int) -> Config:
    """From bench_small_batch's sweep on an H100: few rows per program (many programs in
    flight) and long chunks (many loads in flight per thread)."""
    return Config(block_n=4, block_k=2048 if rows <= 2 else 1024, num_warps=4)


@functools.cache
def _has_pdl(device_index: int | None) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and later."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _load_w(w_rows, ks, row_ok, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
        else:
            w = tl.load(w_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        return w.to(tl.float32)

    @triton.jit
    def _dot_chunk(
        acc, w, x_ptr, x_stride, ks, M, K, inv, norm_ptr,
        M_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """acc[m, :] += w @ xn[m, ks] for each row m; the weight tile is reduced against
        each row in turn (a 3-d broadcast of all rows at once spills registers)."""
        ms = tl.arange(0, M_BLOCK)
        k_ok = ks < K
        if NORM:
            g = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        for m in tl.static_range(M_BLOCK):
            live = k_ok & (tl.full((BLOCK_K,), m, tl.int32) < M)
            x = tl.load(x_ptr + m * x_stride + ks, mask=live, other=0.0)
            xf = x.to(tl.float32)
            if NORM:  # as the rmsnorm kernel: one rounding of x * inv_rms * gain
                inv_m = tl.sum(tl.where(ms == m, inv, 0.0), axis=0)
                xf = (xf * inv_m * g).to(x.dtype).to(tl.float32)
            part = tl.sum(w * xf[None, :], axis=1)
            if M_BLOCK == 1:
                acc += part[None, :]
            else:
                acc = tl.where(ms[:, None] == m, acc + part[None, :], acc)
        return acc

    @triton.jit
    def _accumulate(
        x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, rows, row_ok, M, K,
        M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """acc[m, i] = sum_k xn[m, k] * W[rows[i], k] (+ bias[rows[i]]), xn = rmsnorm(x)
        when NORM.

        With PDL (programmatic dependent launch) the kernel starts while the one before it
        finishes: it fetches its first weight chunk (weights are never written), then waits
        for the previous kernel's output before it reads x."""
        ms = tl.arange(0, M_BLOCK)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
        ks = tl.arange(0, BLOCK_K)
        w = _load_w(w_rows, ks, row_ok, K, EVEN_K)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:  # each program takes the rows' RMS itself: x is a few KB, in L2
            sq = tl.full((M_BLOCK,), 0.0, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(
                    x_ptr + ms[:, None] * x_stride + kk[None, :],
                    mask=(ms < M)[:, None] & (kk < K)[None, :],
                    other=0.0,
                ).to(tl.float32)
                sq += tl.sum(xk * xk, axis=1)
            inv = tl.rsqrt(sq / K + eps)
        else:
            inv = tl.full((M_BLOCK,), 1.0, tl.float32)
        acc = tl.full((M_BLOCK, BLOCK_N), 0.0, tl.float32)
        acc = _dot_chunk(acc, w, x_ptr, x_stride, ks, M, K, inv, norm_ptr, M_BLOCK, BLOCK_K, NORM)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = _load_w(w_rows, ks, row_ok, K, EVEN_K)
            acc = _dot_chunk(
                acc, w, x_ptr, x_stride, ks, M, K, inv, norm_ptr, M_BLOCK, BLOCK_K, NORM
            )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _rounded_pairs(acc, dtype, M_BLOCK: tl.constexpr, HB: tl.constexpr):
        """The product rounded to the model's dtype (as the unfused path stores it), then
        split into its interleaved pairs: (M_BLOCK, HB) each, in float32."""
        y = acc.to(dtype).to(tl.float32)
        return tl.split(tl.reshape(y, (M_BLOCK, HB, 2)))

    @triton.jit
    def _gemv_kernel(
        x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps,
        res_ptr, res_stride, out_ptr, out_stride, M, N, K,
        M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
        HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = _accumulate(
            x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, rows, row_ok, M, K,
            M_BLOCK, BLOCK_N, BLOCK_K, NORM, HAS_BIAS, EVEN_K, PDL,
        )  # fmt: skip
        ms = tl.arange(0, M_BLOCK)
        ok = (ms < M)[:, None] & row_ok[None, :]
        y = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:  # out is the residual stream: out += x @ W.T, rounded as two ops
            r = tl.load(res_ptr + ms[:, None] * res_stride + rows[None, :], mask=ok, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + ms[:, None] * out_stride + rows[None, :], y, mask=ok)

    @triton.jit
    def _gemv_silu_mul_kernel(
        x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, out_ptr, out_stride, M, HALF_N, K,
        M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """W is [gate; up]: a program takes rows j of both halves, pairs interleaved."""
        HB: tl.constexpr = BLOCK_N // 2
        r = tl.arange(0, BLOCK_N)
        cols = tl.program_id(0) * HB + r // 2
        rows = (r % 2) * HALF_N + cols
        row_ok = cols < HALF_N
        acc = _accumulate(
            x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, rows, row_ok, M, K,
            M_BLOCK, BLOCK_N, BLOCK_K, NORM, HAS_BIAS, EVEN_K, PDL,
        )  # fmt: skip
        dtype = out_ptr.dtype.element_ty
        gate, up = _rounded_pairs(acc, dtype, M_BLOCK, HB)
        act = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
        ms = tl.arange(0, M_BLOCK)
        out_cols = tl.program_id(0) * HB + tl.arange(0, HB)
        ok = (ms < M)[:, None] & (out_cols < HALF_N)[None, :]
        tl.store(out_ptr + ms[:, None] * out_stride + out_cols[None, :], act, mask=ok)

    @triton.jit
    def _qkv_rope_store_kernel(
        x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, pos_ptr, loc_ptr, cs_ptr, cs_stride,
        q_ptr, q_stride, kv_ptr, kv_stride, M, K, NUM_Q, NUM_KV, HEAD_DIM: tl.constexpr,
        M_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """A program takes dims j of one head's two rotate-half halves, pairs interleaved.

        q goes to q_ptr (tokens, NUM_Q * HEAD_DIM); k and v to the pool row of each
        token's slot, laid out (2, NUM_KV, HEAD_DIM): k heads, then v heads, as in Wqkv.
        """
        HB: tl.constexpr = BLOCK_N // 2
        HALF: tl.constexpr = HEAD_DIM // 2
        pid = tl.program_id(0)
        per_head = HALF // HB
        head = pid // per_head
        j = (pid % per_head) * HB + tl.arange(0, HB)
        r = tl.arange(0, BLOCK_N)
        rows = head * HEAD_DIM + (r % 2) * HALF + (pid % per_head) * HB + r // 2
        row_ok = r < BLOCK_N
        acc = _accumulate(
            x_ptr, x_stride, w_ptr, w_stride, bias_ptr, norm_ptr, eps, rows, row_ok, M, K,
            M_BLOCK, BLOCK_N, BLOCK_K, NORM, HAS_BIAS, EVEN_K, PDL,
        )  # fmt: skip
        dtype = q_ptr.dtype.element_ty
        a, b = _rounded_pairs(acc, dtype, M_BLOCK, HB)
        ms = tl.arange(0, M_BLOCK)
        m_ok = ms < M
        if head < NUM_Q + NUM_KV:  # q and k heads rotate; v heads do not
            pos = tl.load(pos_ptr + ms, mask=m_ok, other=0)
            angle = cs_ptr + pos[:, None] * cs_stride + j[None, :]
            cos = tl.load(angle).to(tl.float32)
            sin = tl.load(angle + HALF).to(tl.float32)
            a, b = a * cos - b * sin, b * cos + a * sin
        if head < NUM_Q:
            dst = q_ptr + ms[:, None] * q_stride + head * HEAD_DIM
        else:
            loc = tl.load(loc_ptr + ms, mask=m_ok, other=0)
            dst = kv_ptr + loc[:, None] * kv_stride + (head - NUM_Q) * HEAD_DIM
        tl.store(dst + j[None, :], a.to(dtype), mask=m_ok[:, None])
        tl.store(dst + HALF + j[None, :], b.to(dtype), mask=m_ok[:, None])


def _launch_args(x, weight, bias, norm, config: Config | None, n: int):
    """(m, k, config, the arguments every kernel starts with, the launch's keywords)."""
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"small-batch kernels take at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous along the reduction dim")
    cfg = config or default_config(n, k, m)
    pdl = x.is_cuda and SWITCHES.pdl and _has_pdl(x.device.index)
    norm_w, eps = norm if norm is not None else (weight, 0.0)  # unread without NORM/bias
    lead = (x, x.stride(0), weight, weight.stride(0), weight if bias is None else bias, norm_w, eps)
    meta = dict(
        NORM=norm is not None,
        HAS_BIAS=bias is not None,
        PDL=pdl,
        launch_pdl=pdl,
        M_BLOCK=_pow2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return m, k, cfg, lead, meta


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """y = rmsnorm?(x) @ weight.T + bias. With `residual`, residual += y in place and is
    returned (the residual stream of a decoder layer)."""
    n = weight.shape[0]
    m, k, cfg, lead, meta = _launch_args(x, weight, bias, norm, config, n)
    out = residual if residual is not None else x.new_empty(m, n)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        *lead, out, out.stride(0), out, out.stride(0), m, n, k,
        RESIDUAL=residual is not None, **meta,
    )  # fmt: skip
    return out


def gemv_silu_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """silu(gate) * up, where [gate | up] = rmsnorm?(x) @ weight.T + bias."""
    half = weight.shape[0] // 2
    m, k, cfg, lead, meta = _launch_args(x, weight, bias, norm, config, 2 * half)
    out = x.new_empty(m, half)
    _gemv_silu_mul_kernel[(triton.cdiv(half, cfg.block_n // 2),)](
        *lead, out, out.stride(0), m, half, k, **meta
    )
    return out


def qkv_rope_store(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None,
    positions: torch.Tensor,
    out_cache_loc: torch.Tensor,
    cos_sin: torch.Tensor,
    kv_buffer: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    config: Config | None = None,
) -> torch.Tensor:
    """q (tokens, num_heads * head_dim), rotated; k (rotated) and v stored at out_cache_loc
    in kv_buffer (slots, 2, num_kv_heads, head_dim). cos_sin: (positions, head_dim), the
    cosines of the rotate-half pairs, then their sines."""
    n = weight.shape[0]
    if n != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv weight has {n} rows; heads and head_dim need another count")
    m, k, cfg, lead, meta = _launch_args(x, weight, bias, norm, config, n)
    if (head_dim // 2) % (cfg.block_n // 2):
        raise ValueError(f"block_n {cfg.block_n} must split half of head_dim {head_dim}")
    if kv_buffer.dtype != x.dtype or not kv_buffer[0].is_contiguous():
        raise ValueError("kv_buffer must be contiguous per slot and in the model's dtype")
    q = x.new_empty(m, num_heads * head_dim)
    _qkv_rope_store_kernel[(n // cfg.block_n,)](
        *lead, positions, out_cache_loc, cos_sin, cos_sin.stride(0), q, q.stride(0),
        kv_buffer, kv_buffer.stride(0), m, k, num_heads, num_kv_heads, HEAD_DIM=head_dim,
        **meta,
    )  # fmt: skip
    return q
