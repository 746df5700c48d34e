"""benchmarks/bench_serving.py: its metrics against hand-computed values and its stream
reading against canned responses (its run against a live `loom serve` on a tiny Llama is
in test_benchmarks.py, with the other scripts' smoke runs)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
from pathlib import Path

import httpx
import pytest

# The benchmarks are scripts that import each other by file name, as `python benchmarks/x.py`
# runs them; their folder goes on the path the same way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serving as bs  # noqa: E402

# ---- metrics ----------------------------------------------------------------------------


def test_ttft_and_itl_from_chunk_times():
    ttft, itl = bs.token_latencies(10.0, [(10.5, 1), (10.7, 1), (11.0, 1)])
    assert ttft == pytest.approx(0.5)
    assert itl == pytest.approx([0.2, 0.3])


def test_a_chunk_of_k_tokens_spreads_its_gap_over_k_samples():
    _, itl = bs.token_latencies(0.0, [(1.0, 1), (1.4, 2), (1.5, 1)])
    assert itl == pytest.approx([0.2, 0.2, 0.1])


def test_tokens_arriving_with_the_first_add_no_gap():
    ttft, itl = bs.token_latencies(0.0, [(1.0, 3), (1.4, 1)])
    assert ttft == pytest.approx(1.0)
    assert itl == pytest.approx([0.4])


def test_percentile_interpolates_between_ranks():
    assert bs.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bs.percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    assert bs.percentile([7.0], 99) == 7.0
    assert math.isnan(bs.percentile([], 50))


def test_poisson_arrivals_have_exponential_gaps_of_mean_one_over_rate():
    times = bs.poisson_arrivals(4000, rate=8.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 4000 and times[0] == 0.0
    assert all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: sd = mean


def test_poisson_arrivals_repeat_with_the_seed():
    assert bs.poisson_arrivals(50, 4.0, seed=3) == bs.poisson_arrivals(50, 4.0, seed=3)
    assert bs.poisson_arrivals(50, 4.0, seed=3) != bs.poisson_arrivals(50, 4.0, seed=4)


def test_infinite_rate_sends_everything_at_once():
    assert bs.poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5


def outcome(start, chunks, end, prompt, output, error=None) -> bs.Outcome:
    o = bs.Outcome(input_len=prompt, output_len=output, start=start, end=end, chunks=chunks)
    o.prompt_tokens, o.output_tokens, o.error = prompt, output, error
    return o


def test_summary_of_two_successes_and_a_failure():
    a = outcome(0.0, [(0.5, 1), (0.7, 1), (0.9, 1)], 1.0, prompt=10, output=3)
    b = outcome(1.0, [(2.0, 1), (2.3, 2)], 2.5, prompt=20, output=3)
    failed = outcome(0.0, [], 0.1, prompt=5, output=None, error="HTTP 500: boom")
    s = bs.summarize([a, b, failed], duration=2.5, rate=4.0, concurrency=None)
    assert (s.requests, s.failed) == (3, 1)
    assert s.req_s == pytest.approx(2 / 2.5)
    assert s.output_tok_s == pytest.approx(6 / 2.5)
    assert s.total_tok_s == pytest.approx(36 / 2.5)  # the failure's prompt is not counted
    assert (s.ttft_p50_ms, s.ttft_p99_ms) == pytest.approx((750.0, 995.0))
    assert s.itl_p50_ms == pytest.approx(175.0)  # samples .2 .2 .15 .15
    assert (s.e2e_p50_s, s.e2e_p99_s) == pytest.approx((1.25, 1.495))
    assert s.tpot_mean_ms == pytest.approx(250.0)  # (1.0 - .5) / 2 and (1.5 - 1.0) / 2


def test_summary_when_every_request_failed():
    failed = outcome(0.0, [], 0.1, prompt=5, output=None, error="HTTP 503")
    s = bs.summarize([failed, failed], duration=0.1, rate=math.inf, concurrency=2)
    assert (s.requests, s.failed, s.output_tok_s) == (2, 2, 0.0)
    assert math.isnan(s.ttft_p50_ms) and math.isnan(s.tpot_mean_ms)


# ---- reading a stream -------------------------------------------------------------------


def sse(*events) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def native_chunk(ids: list[int], done: int) -> dict:
    return {
        "text": "x",
        "output_ids": ids,
        "meta_info": {"prompt_tokens": 4, "completion_tokens": done},
    }


def send_to(response: httpx.Response, api: str = "loom", output_len: int = 3) -> bs.Outcome:
    async def go() -> bs.Outcome:
        transport = httpx.MockTransport(lambda request: response)
        async with httpx.AsyncClient(transport=transport) as client:
            return await bs.send(client, "http://server", bs.APIS[api], [1, 2, 3, 4], output_len)

    return asyncio.run(go())


def test_native_stream_counts_tokens_per_chunk():
    body = sse(native_chunk([5], 1), native_chunk([], 1), native_chunk([6, 7], 3), "[DONE]")
    o = send_to(httpx.Response(200, content=body))
    assert o.error is None
    assert [k for _, k in o.chunks] == [1, 2]  # the chunk without tokens is no chunk
    assert (o.prompt_tokens, o.output_tokens) == (4, 3)


def test_openai_stream_takes_counts_from_usage():
    choice = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
    empty = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    o = send_to(httpx.Response(200, content=sse(choice, choice, empty, usage, "[DONE]")), "openai")
    assert o.error is None
    assert [k for _, k in o.chunks] == [1, 1]
    assert (o.prompt_tokens, o.output_tokens) == (4, 2)


@pytest.mark.parametrize(
    "response, error",
    [
        (httpx.Response(503, json={"error": {"message": "full"}}), "HTTP 503"),
        (httpx.Response(200, content=sse(native_chunk([5], 1))), "without [DONE]"),
        (httpx.Response(200, content=sse({"error": {"message": "oom"}}, "[DONE]")), "oom"),
        (httpx.Response(200, content=sse("[DONE]")), "no tokens"),
        (httpx.Response(200, content=b"data: {not json\n\n"), "JSONDecodeError"),
    ],
)
def test_every_failure_is_an_error_not_a_dropped_request(response, error):
    assert error in send_to(response).error


def test_max_concurrency_caps_requests_in_flight():
    in_flight, most = 0, 0
    body = sse(native_chunk([5], 1), "[DONE]")

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, content=body)

    async def go() -> list[bs.Outcome]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            requests = [([1, 2], 1)] * 10
            run = bs.run_setting(client, "http://server", bs.APIS["loom"], requests, [0.0] * 10, 3)
            return (await run)[0]

    outcomes = asyncio.run(go())
    assert most == 3
    assert all(o.error is None for o in outcomes)
