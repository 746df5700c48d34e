"""Small-batch decode kernels (loom/runtime/layers/small_batch.py) against cuBLAS, per
projection of a model, with the weights rotated through enough copies that no replay
finds them in L2 (as in a real step, where each weight is read once).

For each shape and batch size it prints cuBLAS, the Triton kernel at its default config,
and the best config of a sweep, with % of the copy bandwidth. Then the fused layer ops
against the unfused ones they replace (norm + qkv + RoPE + K/V store; norm + gate_up +
SiLU; o and down with the residual add).

    python benchmarks/bench_small_batch.py --model-path benchmarks/configs/llama-3.1-8b \
        --batch-sizes 1,2,4,8 [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from bench_kernels import attention_dims, graph_us, projection_shapes, setup

from loom.runtime.layers import cuda_kernels
from loom.runtime.layers import small_batch as sb

L2_FLUSH_BYTES = 256 << 20  # weights cycled per graph: several times the H100's 50 MB L2


def rotated(make_weight, nbytes: int) -> list[torch.Tensor]:
    return [make_weight() for _ in range(max(2, -(-L2_FLUSH_BYTES // nbytes)))]


def rotated_us(fn, weights: list[torch.Tensor]) -> float:
    """µs per call of fn(w), cycling through the weight copies inside one graph."""
    reps = max(1, 40 // len(weights))
    return graph_us(lambda: [fn(w) for _ in range(reps) for w in weights], reps=1) / (
        reps * len(weights)
    )


def sweep_configs(rows: int) -> list[sb.Config]:
    if rows == 1:
        grid = itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8), (1,))
    else:
        grid = itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8), (1,))
    return [sb.Config(*c) for c in grid]


def linear_table(cfg: dict, batch_sizes: list[int], sweep: bool, bw: float, dev) -> list[dict]:
    out = []
    for name, (n, k) in projection_shapes(cfg).items():
        nbytes = n * k * 2
        weights = rotated(lambda n=n, k=k: torch.randn(n, k, device=dev).bfloat16() * 0.02, nbytes)
        for bs in batch_sizes:
            x = torch.randn(bs, k, device=dev, dtype=torch.bfloat16)
            row = {"op": name, "n": n, "k": k, "bs": bs, "floor_us": nbytes / bw * 1e6}
            row["cublas_us"] = rotated_us(lambda w, x=x: F.linear(x, w), weights)
            row["triton_us"] = rotated_us(lambda w, x=x: sb.gemv(x, w), weights)
            row["default"] = str(sb.default_config(n, k, bs))
            if sweep:
                timed = []
                for c in sweep_configs(bs):
                    try:
                        us = rotated_us(lambda w, x=x, c=c: sb.gemv(x, w, config=c), weights)
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


def fused_table(cfg: dict, batch_sizes: list[int], dev) -> list[dict]:
    """Each fused op of a layer against the unfused ops it replaces."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, d = attention_dims(cfg)
    n_qkv = (heads + 2 * kv_heads) * d
    eps, gain = 1e-5, torch.ones(h, device=dev, dtype=torch.bfloat16)
    cos_sin = torch.randn(4096, d, device=dev)
    pool = torch.zeros(8192, 2, kv_heads, d, device=dev, dtype=torch.bfloat16)
    w_qkv = rotated(lambda: torch.randn(n_qkv, h, device=dev).bfloat16() * 0.02, n_qkv * h * 2)
    w_gu = rotated(lambda: torch.randn(2 * inter, h, device=dev).bfloat16() * 0.02, inter * h * 4)
    out = []
    for bs in batch_sizes:
        x = torch.randn(bs, h, device=dev, dtype=torch.bfloat16)
        res = torch.randn(bs, h, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(bs, device=dev) + 100
        loc = torch.arange(bs, device=dev) + 1

        def qkv_unfused(w, x=x, res=res, pos=pos, loc=loc):
            hn, _ = cuda_kernels.add_rmsnorm(x.clone(), res.clone(), gain, eps)
            qkv, n = F.linear(hn, w), x.shape[0]
            q, k = qkv[:, : heads * d].view(n, heads, d), qkv[:, heads * d :].view(n, -1, d)
            cuda_kernels.rope_inplace(pos, q, k[:, :kv_heads], cos_sin)
            pool[loc] = k.view(n, 2, kv_heads, d)  # the pool's one-kernel store

        def qkv_fused(w, x=x, pos=pos, loc=loc):
            sb.qkv_rope_store(x, w, None, (gain, eps), pos, loc, cos_sin, pool, heads, kv_heads, d)

        def gu_unfused(w, x=x, res=res):
            hn, _ = cuda_kernels.add_rmsnorm(x.clone(), res.clone(), gain, eps)
            cuda_kernels.silu_and_mul(F.linear(hn, w))

        def gu_fused(w, x=x):
            sb.gemv_silu_mul(x, w, norm=(gain, eps))

        for op, unfused, fused, weights in (
            ("norm+qkv+rope+store", qkv_unfused, qkv_fused, w_qkv),
            ("norm+gate_up+silu", gu_unfused, gu_fused, w_gu),
        ):
            row = {"op": op, "bs": bs}
            row["unfused_us"] = rotated_us(unfused, weights)
            row["fused_us"] = rotated_us(fused, weights)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--sweep", action="store_true", help="time a grid of configs per shape")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    cfg, dev, batch_sizes, bw = setup(args.model_path, args.batch_sizes)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    lin = linear_table(cfg, batch_sizes, args.sweep, bw, dev)
    fused = fused_table(cfg, batch_sizes, dev)
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
