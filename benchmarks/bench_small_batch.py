"""Small-batch decode kernels (loom/runtime/layers/small_batch.py) against cuBLAS, per
projection of a model, with the weights rotated through enough copies that no replay
finds them in L2 (as in a real step, where each weight is read once).

For each shape and batch size it prints cuBLAS, the Triton kernel at its default config,
and the best config of a sweep, with % of the copy bandwidth. Then the fused layer ops
against the unfused ones they replace (norm + qkv + RoPE + K/V store; norm + gate_up +
SiLU; o and down with the residual add).

    python benchmarks/bench_small_batch.py --model-path benchmarks/configs/llama-3.1-8b \
        --batch-sizes 1,2,4,8 [--sweep] [--json out.json]

On CPU (--device cpu, as --smoke runs it in CI) the Triton kernels run in Triton's
interpreter (TRITON_INTERPRET=1), cuBLAS is torch's CPU matmul, the unfused ops are the
model's reference layers, and each op is timed on the host's clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import types

import smoke
import torch
import torch.nn.functional as F
from bench_kernels import attention_dims, kernel_us, projection_shapes, setup

from loom.runtime.layers import cuda_kernels
from loom.runtime.layers import small_batch as sb
from loom.runtime.layers.norm import RMSNorm
from loom.runtime.layers.rotary import RotaryEmbedding

# Triton's interpreter takes ~0.1 s a call: the CPU run makes one call per timing, on one
# copy of each weight.
SMOKE = dict(device="cpu", batch_sizes="1", flush_mb=0, calls=1)


def rotated(make_weight, nbytes: int, flush_bytes: int) -> list[torch.Tensor]:
    """Copies of a weight to cycle through, flush_bytes of them (at least two); one if 0."""
    copies = max(2, -(-flush_bytes // nbytes)) if flush_bytes else 1
    return [make_weight() for _ in range(copies)]


def rotated_us(fn, weights: list[torch.Tensor], calls: int) -> float:
    """µs per call of fn(w), cycling through the weight copies inside one graph."""
    reps = max(1, calls // len(weights))
    timed = kernel_us(lambda: [fn(w) for _ in range(reps) for w in weights], weights[0].device, 1)
    return timed / (reps * len(weights))


def sweep_configs(rows: int) -> list[sb.Config]:
    if rows == 1:
        grid = itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8), (1,))
    else:
        grid = itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8), (1,))
    return [sb.Config(*c) for c in grid]


def linear_table(cfg: dict, batch_sizes: list[int], a, bw: float, dev) -> list[dict]:
    out = []
    for name, (n, k) in projection_shapes(cfg).items():
        nbytes = n * k * 2
        weights = rotated(
            lambda n=n, k=k: torch.randn(n, k, device=dev).bfloat16() * 0.02,
            nbytes,
            a.flush_mb << 20,
        )
        for bs in batch_sizes:
            x = torch.randn(bs, k, device=dev, dtype=torch.bfloat16)
            row = {"op": name, "n": n, "k": k, "bs": bs, "floor_us": nbytes / bw * 1e6}
            row["cublas_us"] = rotated_us(lambda w, x=x: F.linear(x, w), weights, a.calls)
            row["triton_us"] = rotated_us(lambda w, x=x: sb.gemv(x, w), weights, a.calls)
            row["default"] = str(sb.default_config(n, k, bs))
            if a.sweep:
                timed = []
                for c in sweep_configs(bs):
                    try:
                        us = rotated_us(
                            lambda w, x=x, c=c: sb.gemv(x, w, config=c), weights, a.calls
                        )
                    except Exception as e:  # a config the compiler refuses (registers)
                        print(f"  {name} bs {bs} {c}: {type(e).__name__}", flush=True)
                        continue
                    timed.append((us, str(c)))
                timed.sort()
                row["best_us"], row["best"] = timed[0]
                row["top5"] = timed[:5]
            out.append(row)
            print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The model's unfused activation (GatedMLP): FlashInfer's kernel, else torch's ops."""
    if cuda_kernels.available(gate_up):
        return cuda_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_table(cfg: dict, batch_sizes: list[int], a, dev) -> list[dict]:
    """Each fused op of a layer against the unfused ops it replaces: the model's layers
    (FlashInfer's norm and RoPE kernels on a GPU, torch's ops on CPU)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, d = attention_dims(cfg)
    n_qkv = (heads + 2 * kv_heads) * d
    eps = 1e-5
    norm = RMSNorm(h, eps).to(dev, torch.bfloat16).requires_grad_(False)
    gain = norm.weight
    rotary = RotaryEmbedding(types.SimpleNamespace(), d, 4096).to(dev)
    cos_sin = rotary.cos_sin
    pool = torch.zeros(8192, 2, kv_heads, d, device=dev, dtype=torch.bfloat16)
    flush = a.flush_mb << 20
    w_qkv = rotated(
        lambda: torch.randn(n_qkv, h, device=dev).bfloat16() * 0.02, n_qkv * h * 2, flush
    )
    w_gu = rotated(
        lambda: torch.randn(2 * inter, h, device=dev).bfloat16() * 0.02, inter * h * 4, flush
    )
    out = []
    for bs in batch_sizes:
        x = torch.randn(bs, h, device=dev, dtype=torch.bfloat16)
        res = torch.randn(bs, h, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(bs, device=dev) + 100
        loc = torch.arange(bs, device=dev) + 1

        def qkv_unfused(w, x=x, res=res, pos=pos, loc=loc):
            hn, _ = norm.forward_with_residual(x.clone(), res.clone())
            qkv, n = F.linear(hn, w), x.shape[0]
            q, k = qkv[:, : heads * d].view(n, heads, d), qkv[:, heads * d :].view(n, -1, d)
            k_heads = k[:, :kv_heads]
            q, k_rotated = rotary(pos, q, k_heads)  # in place on a GPU (FlashInfer's kernel)
            if k_rotated is not k_heads:  # the reference layer's new tensor (CPU)
                k_heads.copy_(k_rotated)
            pool[loc] = k.view(n, 2, kv_heads, d)  # the pool's one-kernel store

        def qkv_fused(w, x=x, pos=pos, loc=loc):
            sb.qkv_rope_store(x, w, None, (gain, eps), pos, loc, cos_sin, pool, heads, kv_heads, d)

        def gu_unfused(w, x=x, res=res):
            hn, _ = norm.forward_with_residual(x.clone(), res.clone())
            silu_and_mul(F.linear(hn, w))

        def gu_fused(w, x=x):
            sb.gemv_silu_mul(x, w, norm=(gain, eps))

        for op, unfused, fused, weights in (
            ("norm+qkv+rope+store", qkv_unfused, qkv_fused, w_qkv),
            ("norm+gate_up+silu", gu_unfused, gu_fused, w_gu),
        ):
            row = {"op": op, "bs": bs}
            row["unfused_us"] = rotated_us(unfused, weights, a.calls)
            row["fused_us"] = rotated_us(fused, weights, a.calls)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--sweep", action="store_true", help="time a grid of configs per shape")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--device", default="cuda", help="cpu: Triton's interpreter, host timers")
    ap.add_argument(
        "--flush-mb",
        type=int,
        default=256,
        help="MB of weight copies cycled per timing: several times the L2 (H100: 50 MB)",
    )
    ap.add_argument("--calls", type=int, default=40, help="kernel calls per timing")
    args = smoke.parse_args(ap, SMOKE)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("on CPU the Triton kernels need its interpreter: set TRITON_INTERPRET=1")
    cfg, dev, batch_sizes, bw = setup(args.model_path, args.batch_sizes, args.device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    lin = linear_table(cfg, batch_sizes, args, bw, dev)
    fused = fused_table(cfg, batch_sizes, args, dev)
    print("\n| op | bs | floor µs | cuBLAS µs | Triton default µs | best µs (config) |")
    print("|---|---|---|---|---|---|")
    for r in lin:
        pct = lambda us, r=r: f"{us:.1f} ({r['floor_us'] / us:.0%})"  # noqa: E731
        best = f"{pct(r['best_us'])} {r['best']}" if "best" in r else "-"
        print(
            f"| {r['op']} {r['n']}x{r['k']} | {r['bs']} | {r['floor_us']:.1f} | "
            f"{pct(r['cublas_us'])} | {pct(r['triton_us'])} | {best} |"
        )
    print("\n| fused op | bs | unfused µs | fused µs |")
    print("|---|---|---|---|")
    for r in fused:
        print(f"| {r['op']} | {r['bs']} | {r['unfused_us']:.1f} | {r['fused_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "linear": lin, "fused": fused}, f, indent=1)


if __name__ == "__main__":
    main()
