"""RadixAttention end to end: shared prefixes are computed once, tight memory forces
eviction and retraction without changing any output, chunked prefill changes nothing."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.engine import Engine
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import SamplingParams
from tests.test_models import make_scheduler, run_scheduler
from tests.tiny_models import VOCAB, hf_greedy, load_reference

GREEDY = {"temperature": 0, "ignore_eos": True}


def _random_ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(2, VOCAB - 2, (n,), generator=g).tolist()


def test_64_requests_share_a_200_token_prefix(tiny_model_factory):
    folder = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(0)
    prefix = _random_ids(200, g)
    prompts = [prefix + _random_ids(int(k), g) for k in torch.randint(3, 12, (64,), generator=g)]
    params = {**GREEDY, "max_new_tokens": 8}
    outputs = {}
    for disable in (False, True):
        with Engine(folder, device="cpu", grammar_backend="none", disable_radix_cache=disable) as e:
            outputs[disable] = e.generate(input_ids=prompts, sampling_params=params)
            info = e.get_server_info()
        if not disable:
            assert info.cache_hit_tokens >= 63 * 200
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outputs[False])
    assert cached[0] < 200 and all(c >= 200 for c in cached[1:]), cached
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in outputs[True])
    assert [o["output_ids"] for o in outputs[False]] == [o["output_ids"] for o in outputs[True]]


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
def test_tiny_pool_evicts_and_retracts_yet_matches_transformers(policy, tiny_model_factory):
    folder = tiny_model_factory("llama")
    hf = load_reference(folder)
    g = torch.Generator().manual_seed(1)
    shared = _random_ids(24, g)
    prompts = [
        (shared if i % 2 else []) + _random_ids(int(k), g)
        for i, k in enumerate(torch.randint(8, 30, (12,), generator=g))
    ]
    # 160 slots: a few requests fit at once, but their 40 new tokens each do not.
    sched = make_scheduler(
        folder, max_total_tokens=160, schedule_policy=policy, chunked_prefill_size=16
    )
    results = run_scheduler(sched, prompts, {**GREEDY, "max_new_tokens": 40}, arrive_every=1)
    for i, p in enumerate(prompts):
        assert results[f"r{i}"][0] == hf_greedy(hf, p, 40), f"prompt {i}"
    info = sched.server_info()
    assert info.retractions_total > 0 and info.evicted_tokens_total > 0
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens
    sched.kv.cache.check_integrity()
    sched.kv.cache.reset()
    assert sched.runner.allocator.available() == info.max_total_tokens
    assert sched.runner.req_to_token_pool.available() == sched.runner.req_to_token_pool.capacity


def test_chunked_prefill_gives_the_same_logits_and_tokens(tiny_model_factory):
    folder = tiny_model_factory("qwen2")
    g = torch.Generator().manual_seed(2)
    prompts = [_random_ids(int(k), g) for k in (70, 33, 101)]
    runs = {}
    for chunk in (-1, 16):
        sched = make_scheduler(folder, chunked_prefill_size=chunk)
        for i, p in enumerate(prompts):
            sched.add_request(
                GenerateRequest(
                    f"r{i}",
                    p,
                    SamplingParams(**GREEDY, max_new_tokens=6),
                    return_logprob=True,
                    logprob_start_len=0,
                    top_logprobs_num=5,
                )
            )
        outs = {}
        while sched.has_work():
            sched.step()
            for o in sched.take_outputs():
                outs[o.rid] = o
        runs[chunk] = outs
    for rid, whole in runs[-1].items():
        chunked = runs[16][rid]
        assert chunked.new_token_ids == whole.new_token_ids
        a = [lp for lp, _ in whole.input_token_logprobs[1:]]
        b = [lp for lp, _ in chunked.input_token_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)
        assert [t for _, t in chunked.input_top_logprobs[1][:3]] == [
            t for _, t in whole.input_top_logprobs[1][:3]
        ]


def test_decode_continues_between_prefill_chunks(tiny_model_factory):
    folder = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(3)
    sched = make_scheduler(folder, chunked_prefill_size=8)
    sched.add_request(
        GenerateRequest("short", _random_ids(5, g), SamplingParams(**GREEDY, max_new_tokens=30))
    )
    sched.step()  # prefill the short request
    sched.add_request(
        GenerateRequest("long", _random_ids(120, g), SamplingParams(**GREEDY, max_new_tokens=2))
    )
    decoded_during_prefill = 0
    while sched.chunked is not None or any(r.rid == "long" for r in sched.waiting):
        before = len(sched.running[0].output_ids) if sched.running else 0
        sched.step()
        if sched.running and sched.running[0].rid == "short":
            decoded_during_prefill += len(sched.running[0].output_ids) > before
    assert decoded_during_prefill >= 5  # 120 tokens in chunks of 8, decode in between
