"""No request blocks the others (issue 17): a request that outgrows the KV pool finishes
with `length` instead of being requeued forever, one that does not fit yet is passed over
by those behind it (until it is aged), a prompt the pool can never hold is refused up
front, and a storm on a pool 10x too small loses nothing and leaks no KV."""

from __future__ import annotations

import threading

import pytest
import torch

from loom.runtime.engine import Engine
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import InvalidRequestError, SamplingParams
from loom.runtime.scheduler.scheduler import Scheduler
from tests.test_models import make_scheduler
from tests.tiny_models import VOCAB

GREEDY = {"temperature": 0, "ignore_eos": True}
POOL = 512  # tokens; the tiny Llama's context is 1024
OUTGROWS = {**GREEDY, "max_new_tokens": 900}  # fits the context, not the pool
HANG_GUARD_S = 300  # only a hang reaches this (a blocked queue once waited forever)


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, VOCAB - 2, (int(k),), generator=g).tolist()
        for k in torch.randint(5, 30, (n,), generator=g)
    ]


def bounded(call):
    """call()'s result, run on a thread joined with a bound: a hang fails the test."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert out, "the call hung (or raised: see the thread's traceback)"
    return out[0]


def assert_pool_empty(engine: Engine) -> None:
    info = engine.get_server_info()
    assert info.running_requests == 0 and info.waiting_requests == 0
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens
    assert engine.flush_cache().ok
    assert engine.get_server_info().available_tokens == info.max_total_tokens


def assert_kv_full(out: dict) -> None:
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "length" and "KV cache is full" in reason["message"], reason
    assert len(out["output_ids"]) < OUTGROWS["max_new_tokens"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with Engine(tiny_llama, device="cpu", max_total_tokens=POOL, grammar_backend="none") as e:
        yield e


def test_a_request_outgrowing_the_pool_finishes_with_length_and_blocks_no_one(engine):
    """Once retracted and requeued first, never admissible again: every request behind
    it waited forever."""
    small = {**GREEDY, "max_new_tokens": 16}
    batch = [[5, 6, 7, 8]] + prompts(6, seed=1)
    outs = bounded(
        lambda: engine.generate(input_ids=batch, sampling_params=[OUTGROWS] + [small] * 6)
    )
    assert_kv_full(outs[0])
    assert [len(o["output_ids"]) for o in outs[1:]] == [16] * 6
    after = engine.generate(input_ids=[9, 10], sampling_params={**GREEDY, "max_new_tokens": 3})
    assert len(after["output_ids"]) == 3
    assert_pool_empty(engine)


def test_a_storm_on_a_pool_ten_times_too_small_loses_nothing(engine):
    batch = prompts(40, seed=2)
    demand = sum(len(p) for p in batch) + 40 * 120
    assert demand >= 10 * POOL
    params = [{**GREEDY, "max_new_tokens": 120}] * 40
    batch[7:7], params[7:7] = [[11, 12, 13]] * 2, [OUTGROWS] * 2  # two that outgrow it
    outs = bounded(lambda: engine.generate(input_ids=batch, sampling_params=params))
    assert len(outs) == 42
    for out in outs[7:9]:
        assert_kv_full(out)
    for out in outs[:7] + outs[9:]:
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert len(out["output_ids"]) == 120
    assert_pool_empty(engine)


def test_a_prompt_the_pool_can_never_hold_is_refused_naming_the_pool(engine):
    with pytest.raises(InvalidRequestError, match=f"KV cache holds {POOL} tokens"):
        engine.generate(input_ids=[5] * POOL, sampling_params={"max_new_tokens": 1})
    ok = engine.generate(input_ids=[5] * (POOL - 1), sampling_params={"max_new_tokens": 1})
    assert len(ok["output_ids"]) == 1


# ---- the scheduler's queue, step by step -----------------------------------------------


def run(sched: Scheduler, arrivals: dict[int, list[GenerateRequest]], max_steps: int) -> list:
    """Step until idle, adding arrivals[k] before step k; the rids in finishing order."""
    finished = []
    for k in range(max_steps):
        for msg in arrivals.get(k, []):
            sched.add_request(msg)
        if not sched.has_work() and k > max(arrivals):
            return finished
        sched.step()
        finished += [o.rid for o in sched.take_outputs() if o.finished_reason is not None]
    raise AssertionError(f"still busy after {max_steps} steps; finished {finished}")


def request(rid: str, prompt: list[int], max_new_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, prompt, SamplingParams(max_new_tokens=max_new_tokens, **GREEDY))


def wide_prompt(n: int, seed: int) -> list[int]:
    """A prompt of n tokens, more than the KV left while the others run."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB - 2, (n,), generator=g).tolist()


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_a_request_that_does_not_fit_yet_is_passed_over(tiny_llama, policy):
    """`wide`'s 400-token prompt cannot join while `long` runs; `small`, behind it, can and
    finishes first (it once waited for `long` to end)."""
    sched = make_scheduler(tiny_llama, max_total_tokens=POOL, schedule_policy=policy)
    arrivals = {
        0: [request("long", [5, 6, 7, 8], 300)],
        4: [request("wide", wide_prompt(400, seed=3), 4), request("small", [9, 10, 11], 4)],
    }
    order = run(sched, arrivals, max_steps=2000)
    assert order.index("small") < order.index("long") < order.index("wide")
    assert sched.runner.allocator.available() + sched.kv.cache.total_size() == POOL


def test_a_passed_over_request_is_not_starved_by_a_stream_of_small_ones(tiny_llama):
    """`wide` fits only beside fewer small requests than keep arriving (one every step),
    so passed over it would wait for the stream to end. Past the aging bound it stops
    the round instead: the small ones wait behind it, and it runs."""
    sched = make_scheduler(tiny_llama, max_total_tokens=POOL, schedule_policy="fcfs")
    arrivals = {0: [request("long", [5, 6, 7, 8], 300)]}
    arrivals[2] = [request("wide", wide_prompt(480, seed=4), 4)]
    for k in range(3, 800):
        arrivals[k] = [request(f"s{k}", [9, 10, k % 200 + 2], 8)]
    order = run(sched, arrivals, max_steps=5000)
    assert order.index("wide") < order.index("s799")
    assert sched.runner.allocator.available() + sched.kv.cache.total_size() == POOL
