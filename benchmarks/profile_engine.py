"""Where a step's time goes, for tuning (prints tables; not a throughput benchmark).

--mode kernels: the CUDA kernels of one eager decode step at a batch size and context
    (torch.profiler), grouped by kernel name, with their share of the step.
--mode host: the offline workload of bench_offline run through the scheduler in this
    process under cProfile: the host functions that cost most, and how long the host
    waited for the device (HostCopy.get) — near zero means the host is the bottleneck.
--mode steps: the same workload without cProfile; each forward's device time (CUDA
    events around it), grouped by kind (prefill / decode by batch size): where a run's
    seconds go, and how much of the wall time the device was idle.

    python benchmarks/profile_engine.py --mode kernels --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --batch-size 1 --context 512

On CPU (--device cpu, as --smoke runs it in CI) "kernels" are torch's CPU ops (their self
time) and the host's clock stands in for CUDA events. --mode takes several modes in turn.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import smoke
import torch
from bench_one_batch import sync

from loom.runtime.args import ServerArgs
from loom.runtime.executor.host_copy import HostCopy
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.forward import ForwardMode
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.scheduler import Scheduler

SMOKE = dict(device="cpu", context=16, num_prompts=2, max_total_tokens=1024)


class HostEvent:
    """torch.cuda.Event's timing on the host's clock, for CPU runs (where a forward returns
    when its work is done)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.seconds - self.seconds) * 1e3


def timing_event(device: torch.device):
    return torch.cuda.Event(enable_timing=True) if device.type == "cuda" else HostEvent()


def profile_kernels(a) -> None:
    args = ServerArgs(
        model_path=a.model_path,
        load_format=a.load_format,
        dtype="bfloat16",
        device=a.device,
        disable_cuda_graph=True,
        max_running_requests=a.batch_size,
        context_length=int(a.context * (1 + a.context_spread)) + 16,
        max_total_tokens=a.batch_size * (int(a.context * (1 + a.context_spread)) + 16) + 64,
    )
    runner = ModelRunner(args, a.model_path)
    reqs, rows = [], []
    gen = torch.Generator().manual_seed(0)
    spread = int(a.context * a.context_spread)
    for i in range(a.batch_size):
        ctx = a.context + int(torch.randint(-spread, spread + 1, (1,), generator=gen))
        req = Req(f"p{i}", [7] * ctx, SamplingParams())
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(ctx))
        req.kv_len = ctx
        reqs.append(req)
        rows.append(req.req_pool_idx)
    dev = runner.device
    last = torch.zeros(runner.req_to_token_pool.num_slots, dtype=torch.int64, device=dev)

    def step():
        slots = runner.allocator.alloc(len(reqs))
        runner.req_to_token_pool.write_positions(rows, [r.kv_len for r in reqs], slots)
        for r in reqs:
            r.kv_len += 1
        runner.forward(batching.decode_batch(reqs, slots, runner.device, last))

    for _ in range(3):
        step()
    sync(dev)
    steps = 5
    start, end = timing_event(dev), timing_event(dev)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    step_ms = start.elapsed_time(end) / steps
    on_gpu = dev.type == "cuda"
    activity = (
        torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    )
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == kind:
            t = totals[e.name[:90]]
            t[0] += (e.device_time_total if on_gpu else e.self_cpu_time_total) / steps
            t[1] += 1 / steps
    total = sum(v[0] for v in totals.values())
    print(
        f"\ndecode step, bs {a.batch_size}, context {a.context} ± {spread}: "
        f"{total / 1e3:.2f} ms of {'kernels' if on_gpu else 'CPU ops (self time)'}, "
        f"{step_ms:.2f} ms a step (events, eager)"
    )
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{us:>9.1f} {calls:>6.0f} {us / total:>6.1%}  {name}")


def sharegpt_scheduler(a) -> tuple[Scheduler, int]:
    """A scheduler holding bench_offline's ShareGPT requests, and their count."""
    import json

    with open(a.sharegpt_path) as f:
        rows = json.load(f)["rows"][: a.num_prompts]
    sched = Scheduler(
        ServerArgs(
            model_path=a.model_path,
            load_format=a.load_format,
            tokenizer_path=a.tokenizer_path,
            dtype="bfloat16",
            device=a.device,
            max_total_tokens=a.max_total_tokens,
            grammar_backend="none",
        ),
        a.model_path,
    )
    for i, r in enumerate(rows):
        params = SamplingParams(max_new_tokens=r["output_len"], ignore_eos=True, temperature=0)
        sched.add_request(GenerateRequest(f"q{i}", r["input_ids"], params))
    return sched, len(rows)


def profile_steps(a) -> None:
    sched, n = sharegpt_scheduler(a)
    runner, forward = sched.runner, sched.runner.forward
    log = []  # (kind, batch size, new tokens, start event, end event)

    def timed(batch):
        start, end = timing_event(runner.device), timing_event(runner.device)
        start.record()
        out = forward(batch)
        end.record()
        kind = "decode" if batch.mode is ForwardMode.DECODE else "prefill"
        log.append((kind, batch.batch_size, batch.input_ids.numel(), start, end))
        return out

    waited = [0.0]
    get = HostCopy.get

    def timed_get(self):
        t = time.perf_counter()
        out = get(self)
        waited[0] += time.perf_counter() - t
        return out

    runner.forward = timed
    HostCopy.get = timed_get
    host = []  # per forward: host seconds of the scheduler step that queued it, less waits
    start = time.perf_counter()
    while sched.has_work():
        t, w, logged = time.perf_counter(), waited[0], len(log)
        sched.step()
        sched.take_outputs()
        forwards = len(log) - logged
        host += [(time.perf_counter() - t - (waited[0] - w)) / max(forwards, 1)] * forwards
    sync(runner.device)
    wall = time.perf_counter() - start
    HostCopy.get = get
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0])
    prev_end = None
    for (kind, bs, tokens, s, e), host_s in zip(log, host, strict=True):
        if kind == "decode":
            top = next(b for b in (1, 16, 64, 128, 256, 512, 1024, 1 << 30) if bs <= b)
            kind = f"decode bs <= {top}"
        g = groups[kind]
        g[0] += 1
        g[1] += s.elapsed_time(e) / 1e3
        g[2] += tokens
        # Device time between the previous forward's end and this one's start: sampling,
        # input copies, and idle time while the host was late.
        g[3] += prev_end.elapsed_time(s) / 1e3 if prev_end is not None else 0.0
        g[4] += host_s
        prev_end = e
    busy = sum(g[1] for g in groups.values())
    tokens = sched.stats["generation_tokens"]
    print(f"\n{n} requests: {wall:.2f} s wall, {tokens / wall:.0f} output tok/s, {len(log)} steps")
    print(f"device busy in forwards {busy:.2f} s ({busy / wall:.1%} of wall)")
    print("gap: device time from the previous forward's end to this one's start (sampling,")
    print("input copies, idle); host: the scheduler step that queued it, less its waits")
    print("| kind | steps | seconds | share of wall | ms / step | gap ms / step | host ms / step | new tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for kind, (steps, secs, toks, gap, hs) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {steps} | {secs:.2f} | {secs / wall:.1%} | {1e3 * secs / steps:.2f} | {1e3 * gap / steps:.2f} | {1e3 * hs / steps:.2f} | {toks} |")  # fmt: skip


def profile_host(a) -> None:
    sched, n = sharegpt_scheduler(a)
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
        f"\n{n} requests: {elapsed:.1f} s, {tokens / elapsed:.0f} output tok/s, "
        f"{sched.stats['forward_steps']} steps"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["kernels", "host", "steps"], nargs="+", required=True)
    p.add_argument("--model-path", required=True)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument(
        "--context-spread", type=float, default=0.0, help="contexts vary by ± this fraction"
    )
    p.add_argument("--sharegpt-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=None, help="host, steps: KV pool")
    a = smoke.parse_args(p, SMOKE)
    for mode in a.mode:
        {"kernels": profile_kernels, "host": profile_host, "steps": profile_steps}[mode](a)


if __name__ == "__main__":
    main()
