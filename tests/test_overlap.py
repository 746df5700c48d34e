"""Overlap scheduling (the host processes step N's tokens while step N + 1 runs) and mixed
steps (running requests decode inside a prefill's forward). The reference is the same
scheduler processing each step before queuing the next, with prefill and decode in
separate steps: neither may change a token, finish reason or logprob, or leak KV."""

from __future__ import annotations

import torch

from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler.scheduler import Scheduler
from tests.test_models import make_scheduler
from tests.tiny_models import VOCAB

# Many stop ids: requests stop at points the host learns only from the tokens.
STOPS = list(range(40, 100))


def _workload(n: int = 20, seed: int = 0, max_new: int | None = None) -> list[GenerateRequest]:
    g = torch.Generator().manual_seed(seed)
    kinds = [
        dict(temperature=0, ignore_eos=True),
        dict(temperature=0, stop_token_ids=STOPS),
        dict(temperature=0.9, top_p=0.9, seed=7, stop_token_ids=STOPS),
        dict(temperature=0, stop_token_ids=STOPS, min_new_tokens=5),
        dict(temperature=0, frequency_penalty=0.5, ignore_eos=True),
    ]
    reqs = []
    for i in range(n):
        n = int(torch.randint(3, 30, (1,), generator=g))
        prompt = torch.randint(2, VOCAB - 2, (n,), generator=g)
        budget = int(torch.randint(1, 25, (1,), generator=g))
        params = SamplingParams(max_new_tokens=max_new or budget, **kinds[i % len(kinds)])
        logprobs = i % 3 == 0
        reqs.append(
            GenerateRequest(
                f"r{i}", prompt.tolist(), params, return_logprob=logprobs, top_logprobs_num=2
            )
        )
    return reqs


def _run(sched: Scheduler, reqs: list[GenerateRequest], abort_at: dict | None = None) -> dict:
    """Submit one request per step; abort_at maps a step number to a rid to abort then.
    Returns rid -> (ids, finish reason, output logprobs)."""
    results: dict = {}
    pending = list(reqs)
    step = 0
    while pending or sched.has_work():
        if pending:
            sched.add_request(pending.pop(0))
        if abort_at and step in abort_at:
            sched.abort(abort_at[step])
        if sched.has_work():
            sched.step()
        step += 1
        for o in sched.take_outputs():
            ids, _, lps = results.get(o.rid, ([], None, []))
            results[o.rid] = (
                ids + o.new_token_ids,
                o.finished_reason,
                lps + o.output_token_logprobs,
            )
    return results


def _assert_pool_restored(sched: Scheduler) -> None:
    info = sched.server_info()
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens
    pool = sched.runner.req_to_token_pool
    assert pool.available() == pool.capacity
    assert sched.inflight is None and not sched.running


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        ids_a, reason_a, lp_a = a[rid]
        ids_b, reason_b, lp_b = b[rid]
        assert ids_a == ids_b, rid
        assert reason_a == reason_b, rid
        assert [t for _, t in lp_a] == [t for _, t in lp_b], rid
        torch.testing.assert_close([v for v, _ in lp_a], [v for v, _ in lp_b], rtol=0, atol=1e-5)


def test_overlap_changes_no_output(tiny_model_factory):
    folder = tiny_model_factory("llama")
    runs, scheds = {}, {}
    for disable in (True, False):
        scheds[disable] = make_scheduler(folder, disable_overlap_schedule=disable)
        runs[disable] = _run(scheds[disable], _workload())
        _assert_pool_restored(scheds[disable])
    assert scheds[True].stats["deferred_steps"] == 0
    assert scheds[False].stats["deferred_steps"] > 10
    reasons = {r[1]["type"] for r in runs[True].values()}
    assert reasons == {"stop", "length"}, reasons
    _same(runs[False], runs[True])


def test_overlap_with_retraction_changes_no_output(tiny_model_factory):
    folder = tiny_model_factory("llama")
    runs = {}
    for disable in (True, False):
        # 160 slots: requests get retracted and re-prefilled while steps are in flight.
        sched = make_scheduler(
            folder, disable_overlap_schedule=disable, max_total_tokens=160, chunked_prefill_size=16
        )
        runs[disable] = _run(sched, _workload(12, seed=1, max_new=40))
        assert sched.stats["retractions"] > 0
        _assert_pool_restored(sched)
    _same(runs[False], runs[True])


def test_abort_while_a_step_is_in_flight(tiny_model_factory):
    folder = tiny_model_factory("llama")
    reqs = [
        GenerateRequest(
            f"r{i}",
            [5 + i, 6, 7, 8],
            SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
        )
        for i in range(4)
    ]
    sched = make_scheduler(folder)
    results = _run(sched, reqs, abort_at={8: "r1"})
    assert results["r1"][1]["type"] == "abort"
    assert 0 < len(results["r1"][0]) < 30
    ref = _run(make_scheduler(folder, disable_overlap_schedule=True), [reqs[i] for i in (0, 2, 3)])
    for rid in ("r0", "r2", "r3"):
        assert results[rid][0] == ref[rid][0] and len(ref[rid][0]) == 30
    _assert_pool_restored(sched)


def test_mixed_prefill_and_decode_steps_change_no_output(tiny_model_factory):
    folder = tiny_model_factory("qwen2")
    runs, scheds = {}, {}
    for mixed in (False, True):
        scheds[mixed] = make_scheduler(
            folder,
            enable_mixed_chunk=mixed,
            disable_overlap_schedule=not mixed,
            chunked_prefill_size=16,
        )
        runs[mixed] = _run(scheds[mixed], _workload(16, seed=2))
        _assert_pool_restored(scheds[mixed])
    assert scheds[False].stats["mixed_steps"] == 0
    assert scheds[True].stats["mixed_steps"] > 5
    assert scheds[True].stats["forward_steps"] < scheds[False].stats["forward_steps"]
    _same(runs[True], runs[False])


def test_decode_steps_built_while_masks_fill_change_no_output(tmp_path):
    """Scheduler._early_decode: a decode step's host part is built while the step before
    it fills its grammar masks, and launched once that step is sampled. Outputs (seeded
    sampling under masks, requests arriving every step, some cut short by their length)
    equal those of the scheduler that builds each decode step afterwards."""
    import json

    import jsonschema

    from tests.grammar_helpers import BOUNDED, build_bpe_llama

    tok = build_bpe_llama(tmp_path)
    reqs = [
        GenerateRequest(
            f"r{i}",
            tok.encode(f"the answer {i} is"),
            SamplingParams(
                max_new_tokens=12 if i % 4 == 0 else 200,
                temperature=0.8,
                seed=i,
                json_schema=json.dumps(BOUNDED),
            ),
        )
        for i in range(10)
    ]
    outs, early = {}, {}
    for on in (True, False):
        sched = make_scheduler(str(tmp_path), grammar_backend="xgrammar")
        sched.early_decode = on
        outs[on] = _run(sched, reqs)
        early[on] = sched.stats["early_decode_steps"]
        _assert_pool_restored(sched)
    assert early[True] > 0 and early[False] == 0
    _same(outs[True], outs[False])
    for ids, reason, _ in outs[True].values():
        if reason["type"] == "stop":
            jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), BOUNDED)
