"""Where a step's time goes, for tuning (prints tables; not a throughput benchmark).

--mode kernels: the CUDA kernels of one eager decode step at a batch size and context
    (torch.profiler), grouped by kernel name, with their share of the step.
--mode host: the offline workload of bench_offline run through the scheduler in this
    process under cProfile: the host functions that cost most, and how long the host
    waited for the device (HostCopy.get) — near zero means the host is the bottleneck.

    python benchmarks/profile_engine.py --mode kernels --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --batch-size 1 --context 512
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch

from loom.runtime.args import ServerArgs
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.scheduler import Scheduler


def profile_kernels(a) -> None:
    args = ServerArgs(
        model_path=a.model_path,
        load_format=a.load_format,
        dtype="bfloat16",
        disable_cuda_graph=True,
        max_running_requests=a.batch_size,
        context_length=a.context + 16,
        max_total_tokens=a.batch_size * (a.context + 16) + 64,
    )
    runner = ModelRunner(args, a.model_path)
    reqs, rows = [], []
    for i in range(a.batch_size):
        req = Req(f"p{i}", [7] * a.context, SamplingParams())
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(a.context))
        req.kv_len = a.context
        reqs.append(req)
        rows.append(req.req_pool_idx)
    last = torch.zeros(runner.req_to_token_pool.num_slots, dtype=torch.int64, device="cuda")

    def step():
        slots = runner.allocator.alloc(len(reqs))
        runner.req_to_token_pool.write_positions(rows, [r.kv_len for r in reqs], slots)
        for r in reqs:
            r.kv_len += 1
        runner.forward(batching.decode_batch(reqs, slots, runner.device, last))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[e.name[:90]]
            t[0] += e.device_time_total / steps
            t[1] += 1 / steps
    total = sum(v[0] for v in totals.values())
    print(f"\ndecode step, bs {a.batch_size}, context {a.context}: {total / 1e3:.2f} ms of kernels")
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{us:>9.1f} {calls:>6.0f} {us / total:>6.1%}  {name}")


def profile_host(a) -> None:
    import json

    with open(a.sharegpt_path) as f:
        rows = json.load(f)["rows"][: a.num_prompts]
    sched = Scheduler(
        ServerArgs(
            model_path=a.model_path,
            load_format=a.load_format,
            tokenizer_path=a.tokenizer_path,
            dtype="bfloat16",
            grammar_backend="none",
        ),
        a.model_path,
    )
    for i, r in enumerate(rows):
        params = SamplingParams(max_new_tokens=r["output_len"], ignore_eos=True, temperature=0)
        sched.add_request(GenerateRequest(f"q{i}", r["input_ids"], params))
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    while sched.has_work():
        sched.step()
        sched.take_outputs()
    prof.disable()
    elapsed = time.perf_counter() - start
    tokens = sched.stats["generation_tokens"]
    print(
        f"\n{len(rows)} requests: {elapsed:.1f} s, {tokens / elapsed:.0f} output tok/s, "
        f"{sched.stats['forward_steps']} steps"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["kernels", "host"], required=True)
    p.add_argument("--model-path", required=True)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--sharegpt-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    a = p.parse_args()
    profile_kernels(a) if a.mode == "kernels" else profile_host(a)


if __name__ == "__main__":
    main()
