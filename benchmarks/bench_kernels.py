"""The decode step's kernels one at a time, each replayed in a CUDA graph (no launch
overhead), with the bytes it must move and the bandwidth it reaches.

Variants measured side by side, to choose between them on the card at hand:
  linear     F.linear(x, W) against the same product written as W @ x.T, and with
             cuBLASLt; shapes of the model's four projections and LM head
  attention  FlashInfer decode through tensor cores (the FA2 prefill kernel, and the
             Hopper FA3 one) and through CUDA cores, per layer, over a paged KV pool of
             page size 1
  kv store   two indexed stores (K, then V) against one store of K and V together
             (the pool's (slots, 2, kv_heads, head_dim) layout)
  silu·mul   FlashInfer's fused kernel against torch's silu and multiply

    python benchmarks/bench_kernels.py --model-path benchmarks/configs/llama-3.1-8b \
        --batch-sizes 1,8,64,256 --context-len 512

On CPU (--device cpu, as --smoke runs it in CI) each op is timed on the host's clock, the
attention is loom's torch_native decode, and the FlashInfer and cuBLASLt variants are left
out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import smoke
import torch
import torch.nn.functional as F
from bench_one_batch import copy_bandwidth

from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.layers.attention.base import Attention
from loom.runtime.layers.attention.torch_native import TorchNativeBackend
from loom.runtime.memory.kv_pool import KVCachePool
from loom.runtime.memory.req_to_token import ReqToTokenPool

SMOKE = dict(device="cpu", batch_sizes="1,2", context_len=16)


def graph_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Microseconds per call of fn, replayed `reps` times inside one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best


def host_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Microseconds per call of fn on the host's clock, after one warm-up call: graph_us's
    CPU counterpart, where a call returns when its work is done."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e6 / reps


def kernel_us(fn: Callable[[], object], dev: torch.device, reps: int = 50) -> float:
    """Microseconds per call of fn, on the device's timer."""
    return graph_us(fn, reps) if dev.type == "cuda" else host_us(fn, reps)


def setup(
    model_path: str, batch_sizes: str, device: str = "cuda"
) -> tuple[dict, torch.device, list[int], float]:
    """The model's HF config, the device, the batch sizes asked for, the copy bandwidth."""
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    dev = torch.device(device)
    return cfg, dev, [int(s) for s in batch_sizes.split(",")], copy_bandwidth(dev)


def attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of an HF config dict."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return heads, kv_heads, cfg.get("head_dim") or cfg["hidden_size"] // heads


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each weight a decode step reads, by name."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, d = attention_dims(cfg)
    return {
        "qkv": ((heads + 2 * kv_heads) * d, h),
        "o": (h, heads * d),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (cfg["vocab_size"], h),
    }


def linear_rows(cfg: dict, batch_sizes: list[int], dev) -> list[tuple]:
    rows = []
    for name, (out_f, in_f) in projection_shapes(cfg).items():
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
        for bs in batch_sizes:
            x = torch.randn(bs, in_f, device=dev, dtype=torch.bfloat16)
            nbytes = w.numel() * 2 + (bs * (in_f + out_f)) * 2
            flops = 2 * bs * out_f * in_f
            variants = {
                "F.linear": lambda x=x, w=w: F.linear(x, w),
                "W @ x.T": lambda x=x, w=w: torch.mm(w, x.t()),
            }
            for variant, fn in variants.items():
                us = kernel_us(fn, dev)
                rows.append(("linear", f"{name} {out_f}x{in_f}", bs, variant, us, nbytes, flops))
            if dev.type != "cuda":  # cuBLASLt: a CUDA library
                continue
            torch.backends.cuda.preferred_blas_library("cublaslt")
            us = graph_us(variants["F.linear"])
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(
                ("linear", f"{name} {out_f}x{in_f}", bs, "F.linear cublasLt", us, nbytes, flops)
            )
    return rows


def attention_rows(
    cfg: dict, batch_sizes: list[int], ctx: int, dev, spread: float = 0.0
) -> list[tuple]:
    """Decode attention per layer; each request's context is ctx, or drawn uniformly from
    ctx ± spread·ctx."""
    heads, kv_heads, d = attention_dims(cfg)
    rows = []
    max_bs = max(batch_sizes)
    slots = max_bs * (ctx + int(spread * ctx)) + 1
    kv = torch.randn(slots, 2, 1, kv_heads, d, device=dev, dtype=torch.bfloat16)
    workspace = None  # FlashInfer's, on a GPU
    if dev.type == "cuda":
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    gen = torch.Generator().manual_seed(0)
    label = f"decode ctx {ctx}" + (f" ± {spread:.0%}" if spread else "")
    for bs in batch_sizes:
        q = torch.randn(bs, heads, d, device=dev, dtype=torch.bfloat16)
        half = int(spread * ctx)
        lens = ctx + torch.randint(-half, half + 1, (bs,), generator=gen, dtype=torch.int32)
        indptr = torch.zeros(bs + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=indptr[1:])
        total = int(indptr[-1])
        indices = torch.randperm(slots - 1, device=dev)[:total].to(torch.int32) + 1
        nbytes = total * 2 * kv_heads * d * 2
        flops = 4 * total * heads * d
        if dev.type != "cuda":
            us = _torch_native_decode_us(kv, q, lens, indices)
            rows.append(("attention", label, bs, "torch_native", us, nbytes, flops))
            continue
        variants = {"tensor cores": (True, "auto"), "CUDA cores": (False, "auto")}
        if torch.cuda.get_device_capability(dev)[0] == 9:
            variants["tensor cores, FA3"] = (True, "fa3")
        for variant, (tc, backend) in variants.items():
            try:
                us = _decode_us(workspace, kv, q, indptr, indices, tc, backend)
            except Exception as e:  # a backend this build or card lacks
                print(f"{variant} at bs {bs}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(("attention", label, bs, variant, us, nbytes, flops))
    return rows


def _torch_native_decode_us(kv, q, lens, indices) -> float:
    """Microseconds of one layer's decode attention through loom's torch_native backend
    (the CPU counterpart of FlashInfer's decode), planned once as the engine plans a step."""
    bs, heads, d = q.shape
    kv_heads, dev = kv.shape[3], q.device
    pool = KVCachePool(kv.shape[0] - 1, 1, kv_heads, d, kv.dtype, dev)
    pool.layer(0).buffer.copy_(kv[:, :, 0])
    table = ReqToTokenPool(bs, int(lens.max()), dev)
    starts = [0, *torch.cumsum(lens, 0).tolist()]
    for row in range(bs):
        table.write(row, 0, indices[starts[row] : starts[row + 1]])
    backend = TorchNativeBackend(table)
    layer = Attention(0, heads, kv_heads, d, d**-0.5)
    layer.bind(backend, pool.layer(0))
    batch = ForwardBatch(
        mode=ForwardMode.DECODE,
        batch_size=bs,
        input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),  # unread by attention
        positions=(lens - 1).to(dev, torch.int64),
        req_pool_indices=torch.arange(bs, device=dev),
        seq_lens=lens.to(dev, torch.int64),
        out_cache_loc=torch.zeros(bs, dtype=torch.int64, device=dev),
        seq_lens_cpu=lens.tolist(),
    )
    backend.plan(batch)
    return kernel_us(lambda: backend.decode(q, layer, batch), dev)


def _decode_us(workspace, kv, q, indptr, indices, tc, backend) -> float:
    """Microseconds of one layer's decode attention through a FlashInfer decode wrapper."""
    import flashinfer

    bs, heads, d = q.shape
    kv_heads, dev = kv.shape[3], q.device
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=tc,
        backend=backend,
        paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=dev),
        paged_kv_indices_buffer=torch.zeros_like(indices),
        paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=dev),
    )
    wrapper.plan(
        indptr, indices, torch.ones(bs, dtype=torch.int32), heads, kv_heads, d, 1,
        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
    )  # fmt: skip
    return graph_us(lambda: wrapper.run(q, kv))


def store_rows(cfg: dict, batch_sizes: list[int], dev) -> list[tuple]:
    heads, kv_heads, d = attention_dims(cfg)
    rows = []
    pool = torch.zeros(65536, 2, kv_heads, d, device=dev, dtype=torch.bfloat16)
    k_buf, v_buf = pool[:, 0], pool[:, 1]
    for bs in batch_sizes:
        qkv = torch.randn(bs, (heads + 2 * kv_heads) * d, device=dev, dtype=torch.bfloat16)
        k = qkv[:, heads * d : (heads + kv_heads) * d].view(bs, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d :].view(bs, kv_heads, d)
        kv = qkv[:, heads * d :].view(bs, 2, kv_heads, d)
        loc = torch.randperm(65535, device=dev)[:bs] + 1
        nbytes = 2 * bs * 2 * kv_heads * d * 2

        def two(loc=loc, k=k, v=v):
            k_buf[loc] = k
            v_buf[loc] = v

        def one(loc=loc, kv=kv):
            pool[loc] = kv

        rows.append(("kv store", "per layer", bs, "K then V", kernel_us(two, dev), nbytes))
        rows.append(("kv store", "per layer", bs, "K and V at once", kernel_us(one, dev), nbytes))
    return rows


def silu_rows(cfg: dict, batch_sizes: list[int], dev) -> list[tuple]:
    inter = cfg["intermediate_size"]
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 2 * inter, device=dev, dtype=torch.bfloat16)
        nbytes = bs * 3 * inter * 2

        def torch_silu(x=x):
            gate, up = x.split(inter, dim=-1)
            return F.silu(gate) * up

        if dev.type == "cuda":
            import flashinfer.activation

            fused = graph_us(lambda x=x: flashinfer.activation.silu_and_mul(x))
            rows.append(("silu·mul", "", bs, "flashinfer", fused, nbytes))
        rows.append(("silu·mul", "", bs, "torch", kernel_us(torch_silu, dev), nbytes))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", default="benchmarks/configs/llama-3.1-8b")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--context-spread", type=float, default=0.0, help="contexts vary by ± this")
    p.add_argument("--only", default="linear,attention,store,silu")
    p.add_argument("--device", default="cuda", help="cpu: host timers, no FlashInfer")
    a = smoke.parse_args(p, SMOKE)
    cfg, dev, sizes, bw = setup(a.model_path, a.batch_sizes, a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name}; copy bandwidth {bw / 1e12:.2f} TB/s; {a.model_path}")
    groups = {
        "linear": lambda: linear_rows(cfg, sizes, dev),
        "attention": lambda: attention_rows(cfg, sizes, a.context_len, dev, a.context_spread),
        "store": lambda: store_rows(cfg, sizes, dev),
        "silu": lambda: silu_rows(cfg, sizes, dev),
    }
    print("| op | shape | bs | variant | µs | bytes | TB/s | % of copy bw | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.only.split(","):
        for op, shape, bs, variant, us, nbytes, *flops in groups[name]():
            tbs = nbytes / (us * 1e-6) / 1e12
            pct = 100 * nbytes / (us * 1e-6) / bw
            tflops = f"{flops[0] / (us * 1e-6) / 1e12:.0f}" if flops else ""
            print(f"| {op} | {shape} | {bs} | {variant} | {us:.1f} | {nbytes:,} | {tbs:.2f} | {pct:.0f}% | {tflops} |")  # fmt: skip


if __name__ == "__main__":
    main()
