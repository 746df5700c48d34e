"""The small-batch decode kernels against torch's ops, run by Triton's interpreter on CPU
(conftest sets TRITON_INTERPRET there) and compiled on a GPU when one is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def sb():
    import loom.runtime.layers.small_batch as module

    return module


def bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(DEVICE)


def rmsnorm_ref(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def close(actual, expected):
    """Within bf16 rounding: a product rounded one ulp apart (2^-8 of its size) moves what
    follows by about that much of the largest value."""
    expected = expected.float()
    atol = 1e-2 * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=atol)


SMALL = dict(block_n=8, block_k=32)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: the reduction is not a whole number of chunks
def test_gemv_matches_linear(sb, rows, k):
    x, w, b = bf16(rows, k), bf16(40, k, scale=0.1, seed=1), bf16(40, seed=2)
    close(sb.gemv(x, w, b, config=sb.Config(**SMALL)), F.linear(x.float(), w.float(), b.float()))
    close(sb.gemv(x, w, config=sb.Config(**SMALL)), F.linear(x.float(), w.float()))


def test_gemv_with_norm_adds_into_residual(sb):
    x, w, g = bf16(2, 64), bf16(24, 64, scale=0.1, seed=1), bf16(64, seed=3)
    residual = bf16(2, 24, seed=4)
    expected = (
        residual.float()
        + F.linear(rmsnorm_ref(x, g, 1e-5).float(), w.float()).to(torch.bfloat16).float()
    )
    out = sb.gemv(x, w, norm=(g, 1e-5), residual=residual, config=sb.Config(**SMALL))
    assert out.data_ptr() == residual.data_ptr()  # in place
    close(residual, expected)


@pytest.mark.parametrize("rows", [1, 5])
def test_gemv_silu_mul(sb, rows):
    x, w, g, b = bf16(rows, 64), bf16(48, 64, scale=0.2, seed=1), bf16(64, seed=3), bf16(48)
    gate_up = F.linear(rmsnorm_ref(x, g, 1e-6).float(), w.float(), b.float())
    gate, up = gate_up.to(torch.bfloat16).float().chunk(2, dim=-1)  # the unfused path's rounding
    out = sb.gemv_silu_mul(x, w, b, norm=(g, 1e-6), config=sb.Config(**SMALL))
    assert out.shape == (rows, 24)
    close(out, F.silu(gate) * up)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_rope_store(sb, bias):
    heads, kv_heads, d, hidden, rows = 4, 2, 16, 64, 3
    n = (heads + 2 * kv_heads) * d
    x, w, g = bf16(rows, hidden), bf16(n, hidden, scale=0.2, seed=1), bf16(hidden, seed=3)
    b = bf16(n, seed=5) if bias else None
    positions = torch.tensor([0, 7, 30], device=DEVICE)
    slots = torch.tensor([5, 2, 9], device=DEVICE)
    freqs = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    kv = torch.zeros(12, 2, kv_heads, d, dtype=torch.bfloat16, device=DEVICE)

    q = sb.qkv_rope_store(
        x, w, b, (g, 1e-5), positions, slots, cos_sin, kv, heads, kv_heads, d, sb.Config(**SMALL)
    )
    qkv = F.linear(rmsnorm_ref(x, g, 1e-5).float(), w.float(), None if b is None else b.float())
    qkv = qkv.to(torch.bfloat16).float().view(rows, heads + 2 * kv_heads, d)
    cos = cos_sin[positions, : d // 2][:, None]
    sin = cos_sin[positions, d // 2 :][:, None]
    close(q.view(rows, heads, d), rotate(qkv[:, :heads], cos, sin))
    close(kv[slots, 0], rotate(qkv[:, heads : heads + kv_heads], cos, sin))
    close(kv[slots, 1], qkv[:, heads + kv_heads :])
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not kv[untouched.to(DEVICE)].any()  # only the batch's slots are written


def test_bad_shapes_are_refused(sb):
    x, w = bf16(9, 64), bf16(16, 64)
    with pytest.raises(ValueError, match="at most 8 rows"):
        sb.gemv(x, w)
    with pytest.raises(ValueError, match="qkv weight has 16 rows"):
        sb.qkv_rope_store(
            x[:1], w, None, None, None, None, None, None, 4, 2, 16, sb.Config(**SMALL)
        )
