"""loom's Triton kernels (small_batch's decode kernels, rope_store) against torch's ops, run
by Triton's interpreter on CPU (conftest sets TRITON_INTERPRET there) and compiled on a GPU
when one is present."""

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


def rope_cache(d: int, positions: int = 64) -> torch.Tensor:
    """(positions, d) float32: the cosines of the rotate-half pairs, then their sines."""
    freqs = torch.outer(torch.arange(float(positions)), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


@pytest.mark.parametrize(
    "heads, kv_heads, d, tokens",
    [(4, 2, 16, 5), (32, 8, 64, 3), (14, 2, 64, 1)],  # 8, 48 and 18 heads: 1, 3, 2 programs
)
def test_rope_store(heads, kv_heads, d, tokens):
    from loom.runtime.layers.rope_store import rope_store

    qkv = bf16(tokens, (heads + 2 * kv_heads) * d)
    positions = torch.tensor([0, 63, 7, 30, 1][:tokens], device=DEVICE)
    slots = torch.tensor([5, 2, 9, 11, 1][:tokens], device=DEVICE)
    cos_sin = rope_cache(d)
    kv = torch.zeros(12, 2, kv_heads, d, dtype=torch.bfloat16, device=DEVICE)

    q = rope_store(qkv, positions, cos_sin, kv, slots, heads, kv_heads, d)
    parts = qkv.float().view(tokens, heads + 2 * kv_heads, d)
    cos = cos_sin[positions, : d // 2][:, None]
    sin = cos_sin[positions, d // 2 :][:, None]
    assert q.shape == (tokens, heads, d) and q.is_contiguous()
    close(q, rotate(parts[:, :heads], cos, sin))
    close(kv[slots, 0], rotate(parts[:, heads : heads + kv_heads], cos, sin))
    v = qkv.view(tokens, heads + 2 * kv_heads, d)[:, heads + kv_heads :]
    assert torch.equal(kv[slots, 1], v)  # v is copied, not rotated
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not kv[untouched.to(DEVICE)].any()  # only the batch's slots are written


def test_rope_store_refuses_mismatched_shapes():
    from loom.runtime.layers.rope_store import rope_store

    qkv, cos_sin = bf16(3, 8 * 16), rope_cache(16)
    positions = slots = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    kv = torch.zeros(12, 2, 2, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv must be \(tokens, 96\)"):
        rope_store(qkv, positions, cos_sin, kv, slots, 2, 2, 16)  # 6 heads, not 8
    with pytest.raises(ValueError, match="kv_buffer must be"):
        rope_store(qkv, positions, cos_sin, kv.float(), slots, 4, 2, 16)
    with pytest.raises(ValueError, match="one entry per token"):
        rope_store(qkv, positions[:2], cos_sin, kv, slots, 4, 2, 16)
    assert not kv.any()  # nothing written


# qwen2: a bias on q, k and v; qwen3: q/k norms before RoPE, so the kernel must not run
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_model_with_rope_store_matches_reference_layers(arch, tiny_model_factory, monkeypatch):
    """A prefill and two decode steps with RoPE and the K/V store fused (forced on, also on
    CPU) and through the reference layers: the same logits. In float32, so that what is
    compared is the kernel's arithmetic and layout, not bf16 rounding."""
    from loom.runtime.args import ServerArgs
    from loom.runtime.executor.model_runner import ModelRunner
    from loom.runtime.layers import rope_store
    from loom.runtime.scheduler import batch as batching
    from tests.test_models import _start, random_prompts

    folder = tiny_model_factory(arch)
    prompts = random_prompts(3, seed=4)
    calls = []
    kernel = rope_store.rope_store
    monkeypatch.setattr(rope_store, "rope_store", lambda *a: calls.append(1) or kernel(*a))

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(rope_store, "available", lambda qkv, head_dim: fused)
        args = ServerArgs(
            model_path=folder,
            device=DEVICE,
            dtype="float32",
            attention_backend="torch_native",
            disable_cuda_graph=True,
            max_total_tokens=512,
        )
        runner = ModelRunner(args, folder)
        reqs = _start(runner, prompts)
        pool = runner.req_to_token_pool
        logits = [runner.forward(batching.extend_batch(reqs, [0] * 3, pool, DEVICE)).next_logits]
        last = torch.zeros(pool.num_slots, dtype=torch.int64, device=DEVICE)
        for _ in range(2):
            for req, row in zip(reqs, logits[-1]):
                last[req.req_pool_idx] = int(row.argmax())
            slots = runner.allocator.alloc(len(reqs))
            for req, slot in zip(reqs, slots):
                pool.write(req.req_pool_idx, req.kv_len, slot.view(1))
                req.kv_len += 1
            batch = batching.decode_batch(reqs, slots, DEVICE, last)
            logits.append(runner.forward(batch).next_logits)
        return logits

    with_kernel = run(True)
    assert bool(calls) == (arch != "qwen3")
    calls.clear()
    for got, reference in zip(with_kernel, run(False), strict=True):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    assert not calls
