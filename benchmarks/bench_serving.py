r"""Online serving: streamed requests to `loom serve`, arriving as a Poisson process at
--request-rate and/or capped at --max-concurrency in flight; time to first token (TTFT),
inter-token latency (ITL), end-to-end latency (E2E) p50 / p99 and throughput. Each pair of a
rate and a concurrency given is one setting, one table row. Output lengths are fixed
(ignore_eos); prompts are sent as token ids, so prompt lengths are exact.

    python benchmarks/bench_serving.py --launch --num-prompts 16 --dataset random \
        --random-input-len 64 --random-output-len 16 --request-rate 4 inf
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --backend openai \
        --dataset sharegpt --sharegpt-path ASSETS/sharegpt.json --num-prompts 1000 \
        --max-concurrency 64 256
    python benchmarks/bench_serving.py --launch --smoke --model-path TINY_MODEL   (CI, on CPU)

--launch starts `loom serve` (loom.Runtime) with the server flags below and stops it at the
end; --base-url targets one already running. --backend loom streams the native /generate,
openai the OpenAI /v1/completions.

Measured per request, on the client: TTFT from sending to the first chunk that carries a
token; E2E from sending to `[DONE]`; TPOT = (E2E - TTFT) / (output tokens - 1). ITL: each
later token-carrying chunk that arrives a gap g after the previous one and carries k tokens
adds k samples of g / k (a chunk's tokens are spread evenly over its gap); tokens that
arrive with the first one add none. /generate chunks give k exactly (`output_ids` deltas);
OpenAI chunks carry only text, so each non-empty one counts as one token there (tokens
whose text is held back until a later chunk merge into that chunk's gap). Output and prompt
token counts are the server's (meta_info, or the stream's usage), never re-tokenized.
Between settings the server's prefix cache is flushed, so no setting inherits another's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import httpx
import numpy as np
import smoke
from bench_offline import load_requests  # the random and sharegpt datasets

from loom.backends.runtime import Runtime
from loom.runtime.args import ServerArgs

WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN = 16, 4
SMOKE = dict(
    device="cpu",
    max_total_tokens=4096,
    grammar_backend="none",
    num_prompts=2,
    random_input_len=16,
    random_output_len=4,
)

# ---- metrics (pure) ---------------------------------------------------------------------


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests arriving as a Poisson process of
    `rate` per second: exponential gaps, the first request at 0. rate inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def token_latencies(start: float, chunks: list[tuple[float, int]]) -> tuple[float, list[float]]:
    """TTFT and inter-token latencies of one request from its token-carrying chunks,
    (arrival time, tokens in it) in order; see the module docstring for multi-token chunks."""
    (first, _), *rest = chunks
    itl, prev = [], first
    for t, k in rest:
        itl += [(t - prev) / k] * k
        prev = t
    return first - start, itl


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); nan if empty."""
    return float(np.percentile(values, q)) if values else math.nan


# ---- one request ------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it. A request failed iff `error` is set."""

    input_len: int
    output_len: int  # asked for
    start: float = 0.0
    end: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)
    prompt_tokens: int | None = None  # as the server reports
    output_tokens: int | None = None
    error: str | None = None

    def record(self) -> dict:
        ttft, itl = token_latencies(self.start, self.chunks) if self.error is None else (None, [])
        return {
            "input_len": self.input_len,
            "output_len": self.output_len,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft": ttft,
            "itl": itl,
            "e2e": self.end - self.start,
            "error": self.error,
        }


class Event(NamedTuple):
    """What one stream event tells: new tokens, and token counts if it reports them."""

    tokens: int
    prompt_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class Api:
    path: str
    body: Callable[[list[int], int], dict]
    parse: Callable[[dict], Event]


def native_body(input_ids: list[int], output_len: int) -> dict:
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    return {"input_ids": input_ids, "sampling_params": params, "stream": True}


def native_event(data: dict) -> Event:
    meta = data["meta_info"]  # counts so far, on every chunk
    return Event(len(data["output_ids"]), meta["prompt_tokens"], meta["completion_tokens"])


def openai_body(input_ids: list[int], output_len: int) -> dict:
    return {
        "prompt": input_ids,
        "max_tokens": output_len,
        "ignore_eos": True,  # loom's (and vLLM's, SGLang's) extra-body field
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def openai_event(data: dict) -> Event:
    usage = data.get("usage")
    if usage:  # the last event: choices is empty
        return Event(0, usage["prompt_tokens"], usage["completion_tokens"])
    return Event(int(any(c.get("text") for c in data["choices"])))


APIS = {
    "loom": Api("/generate", native_body, native_event),
    "openai": Api("/v1/completions", openai_body, openai_event),
}


async def send(
    client: httpx.AsyncClient, url: str, api: Api, input_ids: list[int], output_len: int
) -> Outcome:
    """One streamed request; every failure (HTTP status, transport, error event, a stream
    cut short) is caught into the Outcome."""
    o = Outcome(len(input_ids), output_len, start=time.perf_counter())
    try:
        async with client.stream("POST", url + api.path, json=api.body(input_ids, output_len)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                o.error = f"HTTP {r.status_code}: {body[:300]}"
            else:
                await _read_stream(r, api, o)
    except (httpx.HTTPError, ValueError, KeyError) as e:  # ValueError: a malformed event
        o.error = f"{type(e).__name__}: {e}"
    o.end = time.perf_counter()
    return o


async def _read_stream(r: httpx.Response, api: Api, o: Outcome) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        now, data = time.perf_counter(), line[len("data: ") :]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            o.error = f"error event: {event['error'].get('message')}"
            return
        parsed = api.parse(event)
        if parsed.tokens:
            o.chunks.append((now, parsed.tokens))
        if parsed.output_tokens is not None:
            o.prompt_tokens, o.output_tokens = parsed.prompt_tokens, parsed.output_tokens
    else:
        o.error = "the stream ended without [DONE]"
        return
    if not o.chunks or o.output_tokens is None:
        o.error = "the stream carried no tokens or no token counts"


# ---- one setting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    request_rate: float
    max_concurrency: int | None
    requests: int
    failed: int
    duration_s: float
    req_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_s: float
    e2e_p99_s: float
    tpot_mean_ms: float


def summarize(
    outcomes: list[Outcome], duration: float, rate: float, concurrency: int | None
) -> Summary:
    done = [o for o in outcomes if o.error is None]
    latencies = [token_latencies(o.start, o.chunks) for o in done]
    ttft = [t for t, _ in latencies]
    itl = [g for _, gaps in latencies for g in gaps]
    e2e = [o.end - o.start for o in done]
    tpot = [
        (o.end - o.start - t) / (o.output_tokens - 1)
        for o, (t, _) in zip(done, latencies)
        if o.output_tokens > 1
    ]
    output = sum(o.output_tokens for o in done)
    prompt = sum(o.prompt_tokens or 0 for o in done)
    return Summary(
        request_rate=rate,
        max_concurrency=concurrency,
        requests=len(outcomes),
        failed=len(outcomes) - len(done),
        duration_s=duration,
        req_s=len(done) / duration,
        output_tok_s=output / duration,
        total_tok_s=(prompt + output) / duration,
        ttft_p50_ms=1000 * percentile(ttft, 50),
        ttft_p99_ms=1000 * percentile(ttft, 99),
        itl_p50_ms=1000 * percentile(itl, 50),
        itl_p99_ms=1000 * percentile(itl, 99),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p99_s=percentile(e2e, 99),
        tpot_mean_ms=1000 * float(np.mean(tpot)) if tpot else math.nan,
    )


async def run_setting(
    client: httpx.AsyncClient,
    url: str,
    api: Api,
    requests: list[tuple[list[int], int]],
    arrivals: list[float],
    concurrency: int | None,
) -> tuple[list[Outcome], float]:
    """Each request is sent at its arrival time, or later while `concurrency` are in flight;
    its latencies count from the send (SGLang's and vLLM's convention)."""
    gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(input_ids: list[int], output_len: int, at: float) -> Outcome:
        await asyncio.sleep(start + at - time.perf_counter())
        async with gate:
            return await send(client, url, api, input_ids, output_len)

    outcomes = await asyncio.gather(*(one(i, n, at) for (i, n), at in zip(requests, arrivals)))
    return list(outcomes), time.perf_counter() - start


# ---- the run ----------------------------------------------------------------------------

COLUMNS = (
    "rate | conc | reqs | failed | time s | req/s | out tok/s | total tok/s | TTFT p50 ms | "
    "TTFT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 s | E2E p99 s | TPOT ms"
)


def table_row(s: Summary) -> str:
    conc = "-" if s.max_concurrency is None else s.max_concurrency
    return (
        f"| {s.request_rate:g} | {conc} | {s.requests} | {s.failed} | {s.duration_s:.2f} | "
        f"{s.req_s:.2f} | {s.output_tok_s:.1f} | {s.total_tok_s:.1f} | {s.ttft_p50_ms:.1f} | "
        f"{s.ttft_p99_ms:.1f} | {s.itl_p50_ms:.1f} | {s.itl_p99_ms:.1f} | {s.e2e_p50_s:.2f} | "
        f"{s.e2e_p99_s:.2f} | {s.tpot_mean_ms:.1f} |"
    )


def report_problems(outcomes: list[Outcome]) -> None:
    errors = collections.Counter(o.error for o in outcomes if o.error is not None)
    for error, count in errors.most_common(5):
        print(f"  {count} failed: {error}", file=sys.stderr)
    short = sum(o.error is None and o.output_tokens != o.output_len for o in outcomes)
    if short:
        print(f"  {short} requests returned a different token count than asked", file=sys.stderr)


async def load_prompts(client: httpx.AsyncClient, url: str, a: argparse.Namespace):
    """bench_offline's requests, token ids in the server's vocabulary."""
    info = (await client.get(url + "/model_info")).raise_for_status().json()
    return load_requests(a, info["vocab_size"]), info


async def benchmark(a: argparse.Namespace, url: str) -> list[Summary]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # no hidden cap
    async with httpx.AsyncClient(timeout=a.request_timeout, limits=limits) as client:
        requests, info = await load_prompts(client, url, a)
        api = APIS[a.backend]
        warm = await send(client, url, api, requests[0][0][:WARMUP_PROMPT_LEN], WARMUP_OUTPUT_LEN)
        if warm.error is not None:
            raise SystemExit(f"the warm-up request failed: {warm.error}")
        print(
            f"\nserving {a.dataset}: {len(requests)} requests, "
            f"{sum(len(i) for i, _ in requests)} prompt tokens, "
            f"{sum(n for _, n in requests)} output tokens; model {info['served_model_name']}; "
            f"{a.backend} API at {url}\n\n| {COLUMNS} |\n|{'---|' * (COLUMNS.count('|') + 1)}",
            flush=True,
        )
        summaries, records = [], []
        for rate, concurrency in itertools.product(a.request_rate, a.max_concurrency):
            flushed = await client.post(url + "/flush_cache")
            if flushed.status_code != 200:  # e.g. others' requests running on a shared server
                print(f"  the prefix cache was not flushed: {flushed.text}", file=sys.stderr)
            arrivals = poisson_arrivals(len(requests), rate, a.seed)
            run = await run_setting(client, url, api, requests, arrivals, concurrency)
            summaries.append(summarize(*run, rate, concurrency))
            print(table_row(summaries[-1]), flush=True)
            report_problems(run[0])
            records.append(
                {**dataclasses.asdict(summaries[-1]), "outcomes": [o.record() for o in run[0]]}
            )
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(_plain({"args": vars(a), "url": url, "settings": records}), f, indent=1)
    return summaries


def _plain(x):
    """JSON without NaN or Infinity: nan (nothing succeeded to measure) -> null, inf -> "inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running loom serve, e.g. http://127.0.0.1:30000")
    target.add_argument("--launch", action="store_true", help="start loom serve (flags below)")
    p.add_argument("--backend", choices=sorted(APIS), default="loom")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--sharegpt-path", default=None, help="from benchmarks/fetch_assets.py")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=0.5)
    p.add_argument(
        "--request-rate", type=float, nargs="+", default=[math.inf], help="req/s (inf: all at once)"
    )
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[None], help="in flight")
    p.add_argument("--seed", type=int, default=0, help="dataset and arrival times")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds")
    p.add_argument("--output-json", default=None, help="per-setting numbers and every request")
    ServerArgs.add_cli_args(p.add_argument_group("server (with --launch)"))
    return smoke.parse_args(p, SMOKE, argv)


def server_kwargs(a: argparse.Namespace) -> dict:
    """The server flags given on the command line (defaults left to the server)."""
    fields = dataclasses.fields(ServerArgs)
    return {f.name: getattr(a, f.name) for f in fields if getattr(a, f.name) != f.default}


def main(argv: list[str] | None = None) -> list[Summary]:
    a = parse_args(argv)
    if a.launch:
        print("starting loom serve ...", file=sys.stderr, flush=True)
    runtime = Runtime(**server_kwargs(a)) if a.launch else None
    try:
        return asyncio.run(benchmark(a, runtime.url if runtime else a.base_url.rstrip("/")))
    finally:
        if runtime is not None:
            runtime.shutdown()


if __name__ == "__main__":
    main()
