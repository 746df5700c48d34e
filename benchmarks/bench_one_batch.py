"""Latency of one prefill and of decode steps against batch size and context length,
beside the bandwidth floor: (weight bytes + KV bytes read) / measured copy bandwidth.

Runs the model runner directly (no scheduler). A decode step is the whole step the engine
takes (plan, forward, greedy pick), timed two ways: "sync" reads the tokens to the host
before building the next step (no overlap); "piped" leaves them on the device so the
host prepares step N+1 while step N runs (what overlap scheduling achieves). "graph" is
the CUDA graph's replay alone.

    python benchmarks/bench_one_batch.py --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --batch-sizes 1,8,64,256 --input-lens 128,1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import smoke
import torch

from loom.runtime.args import ServerArgs
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.memory.kv_pool import KVCachePool
from loom.runtime.models.llama import head_dim_of
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req

SMOKE = dict(device="cpu", dtype="float32", batch_sizes="1,2", input_lens="16", decode_steps=3)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus written; of
    2 GB on a GPU, 256 MB on CPU (past its caches too, in a fraction of the time)."""
    if nbytes is None:
        nbytes = 2 << 30 if device.type == "cuda" else 256 << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(
    runner: ModelRunner, bs: int, input_len: int, steps: int, max_prefill_tokens: int
) -> tuple[float, float, float]:
    dev = runner.device
    g = torch.Generator().manual_seed(bs * 7919 + input_len)
    top = min(1000, runner.vocab_size)  # ids below 1000, in a tiny model's vocabulary too
    reqs = []
    for i in range(bs):
        req = Req(
            f"b{i}", torch.randint(10, top, (input_len,), generator=g).tolist(), SamplingParams()
        )
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(input_len))
        req.kv_len = input_len
        reqs.append(req)
    sync(dev)
    t = time.perf_counter()
    tokens = []
    per_forward = max(1, max_prefill_tokens // input_len)  # as the engine caps a prefill batch
    for i in range(0, bs, per_forward):
        part = reqs[i : i + per_forward]
        out = runner.forward(
            batching.extend_batch(part, [0] * len(part), runner.req_to_token_pool, dev)
        )
        tokens += out.next_logits.argmax(-1).tolist()
    prefill = time.perf_counter() - t
    rows = torch.tensor([r.req_pool_idx for r in reqs], device=dev)
    last_tokens = torch.zeros(runner.req_to_token_pool.num_slots, dtype=torch.int64, device=dev)
    last_tokens[rows] = torch.tensor(tokens, device=dev)
    sync_step = decode_steps(runner, reqs, rows, last_tokens, steps, read_back=True)
    pipelined = decode_steps(runner, reqs, rows, last_tokens, steps, read_back=False)
    graph_ms = graph_replay_ms(runner, bs)
    for req in reqs:
        runner.allocator.free(runner.req_to_token_pool.read(req.req_pool_idx, 0, req.kv_len))
        runner.req_to_token_pool.free(req.req_pool_idx)
    return prefill, sync_step, pipelined, graph_ms


def decode_steps(runner, reqs, rows, last_tokens, steps: int, read_back: bool) -> float:
    """Seconds per decode step. read_back: the host reads each step's tokens before it
    builds the next (a scheduler without overlap); otherwise tokens stay on the device
    and the host runs ahead, the best overlap scheduling can do."""
    dev = runner.device
    times = []
    sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        slots = runner.allocator.alloc(len(reqs))
        runner.req_to_token_pool.write_positions(
            [r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], slots
        )
        for req in reqs:
            req.kv_len += 1
        out = runner.forward(batching.decode_batch(reqs, slots, dev, last_tokens))
        last_tokens[rows] = out.next_logits.argmax(-1)
        if read_back:
            for req, tok in zip(reqs, last_tokens[rows].tolist()):
                req.output_ids.append(tok)
            times.append(time.perf_counter() - t)
    sync(dev)
    if read_back:
        return statistics.median(times[2:] or times)
    return (time.perf_counter() - start) / steps


def graph_replay_ms(runner: ModelRunner, bs: int) -> float:
    """GPU time of the decode graph alone (last plan reused): the step minus host work."""
    graphs = runner.cuda_graphs
    if graphs is None or bs not in graphs.graphs:
        return float("nan")
    graph = graphs.graphs[bs][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    p.add_argument("--input-lens", default="128,1024")
    p.add_argument("--decode-steps", type=int, default=24)
    a = smoke.parse_args(p, SMOKE)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    lens = [int(x) for x in a.input_lens.split(",")]
    args = ServerArgs(
        model_path=a.model_path,
        load_format=a.load_format,
        dtype=a.dtype,
        device=a.device,
        attention_backend=a.attention_backend,
        disable_cuda_graph=a.disable_cuda_graph,
        max_running_requests=max(sizes),
        context_length=max(lens) + 2 * a.decode_steps + 8,
        max_total_tokens=max(sizes) * (max(lens) + 2 * a.decode_steps + 8) + 64,
        cuda_graph_max_bs=max(sizes),
    )
    runner = ModelRunner(args, a.model_path)
    cfg = runner.config
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    kv_token = KVCachePool.bytes_per_token(
        cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim_of(cfg), runner.dtype
    )
    bw = copy_bandwidth(runner.device) if runner.device.type == "cuda" else float("nan")
    print(
        f"\nmodel {a.model_path} ({weight_bytes / 1e9:.2f} GB weights, {runner.dtype}), "
        f"backend {type(runner.attn_backend).__name__}, cuda graphs "
        f"{'on' if runner.cuda_graphs else 'off'}; copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    print(
        f"{'bs':>4} {'in':>5} {'prefill ms':>10} {'prefill tok/s':>13} {'sync ms':>8} "
        f"{'piped ms':>8} {'decode tok/s':>12} {'graph ms':>8} {'floor ms':>8} "
        f"{'floor/piped':>11}"
    )
    for input_len in lens:
        for bs in sizes:
            prefill, sync_step, piped, graph_ms = run_case(
                runner, bs, input_len, a.decode_steps, args.max_prefill_tokens
            )
            ctx = input_len + a.decode_steps * 3 // 2  # mid-run context of the piped steps
            floor = (weight_bytes + bs * ctx * kv_token) / bw
            print(
                f"{bs:>4} {input_len:>5} {prefill * 1e3:>10.1f} {bs * input_len / prefill:>13.0f} "
                f"{sync_step * 1e3:>8.2f} {piped * 1e3:>8.2f} {bs / piped:>12.0f} "
                f"{graph_ms:>8.2f} {floor * 1e3:>8.2f} {floor / piped:>11.1%}"
            )


if __name__ == "__main__":
    main()
