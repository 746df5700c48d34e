"""No single request can stop the scheduler's step loop (issue 17): an error raised for
one request aborts that request with the error named and frees its KV; the requests
beside it complete as if nothing happened, and the next request is served. An error no
request explains still propagates (process.py then fails every request and exits).

Faults are injected on the real paths with monkeypatch, keyed on one request's rid: a
sampling batch that cannot be built (as a 64-bit seed once made it), a finish check that
raises (as a lone surrogate in a stop string once did), a request that cannot be taken in.
"""

from __future__ import annotations

import json

import pytest

from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling import batch as sampling_batches
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import admission
from loom.runtime.scheduler.finish import FinishChecker
from loom.runtime.scheduler.jump_forward import JumpForward
from loom.runtime.scheduler.scheduler import Scheduler
from tests.test_jump_forward import PANGRAM
from tests.test_models import make_scheduler

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = {"a": [5, 6, 7], "bad": [8, 9, 10, 11], "b": [12, 13], "c": [14, 15, 16, 17, 18]}


def requests(max_new_tokens: int = 8) -> list[GenerateRequest]:
    """One request per prompt; `a` samples at a temperature so batches are not all greedy."""
    params = {rid: SamplingParams(max_new_tokens=max_new_tokens, **GREEDY) for rid in PROMPTS}
    params["a"] = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, seed=3)
    return [GenerateRequest(rid, p, params[rid]) for rid, p in PROMPTS.items()]


def run(sched: Scheduler, msgs: list[GenerateRequest]) -> dict:
    """Submit one request per step; rid -> (output ids, finish reason)."""
    results: dict = {}
    pending = list(msgs)
    while pending or sched.has_work():
        if pending:
            sched.add_request(pending.pop(0))
        sched.step()
        for o in sched.take_outputs():
            ids, _ = results.get(o.rid, ([], None))
            results[o.rid] = (ids + o.new_token_ids, o.finished_reason)
    return results


def assert_pool_restored(sched: Scheduler) -> None:
    info = sched.server_info()
    assert info.running_requests == 0 and info.waiting_requests == 0
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens
    assert sched.flush_cache().ok
    assert sched.runner.allocator.available() == info.max_total_tokens


def raising_for_bad(original, error: Exception, when=lambda *args: True):
    """`original`, raising `error` whenever a request whose rid starts with "bad" is
    among its arguments (alone or in a list) and `when(*args)` holds."""

    def is_bad(value) -> bool:
        values = value if isinstance(value, list) else [value]
        return any(str(getattr(v, "rid", "")).startswith("bad") for v in values)

    def faulty(*args, **kwargs):
        if any(is_bad(a) for a in args) and when(*args):
            raise error
        return original(*args, **kwargs)

    return faulty


FAULTS = {
    # the sampling batch of any step holding "bad" (the seed overflow's place)
    "sampling batch": lambda mp: mp.setattr(
        sampling_batches,
        "sampling_batch",
        raising_for_bad(sampling_batches.sampling_batch, OverflowError("injected: long too big")),
    ),
    # "bad"'s finish check after its third token, while it holds KV mid-decode
    "finish check": lambda mp: mp.setattr(
        FinishChecker,
        "check",
        raising_for_bad(
            FinishChecker.check,
            UnicodeEncodeError("utf-8", "\ud800", 0, 1, "injected"),
            when=lambda _self, req: len(req.output_ids) == 3,
        ),
    ),
    # taking "bad" in
    "admission": lambda mp: mp.setattr(
        admission,
        "admissibility_problem",
        raising_for_bad(admission.admissibility_problem, KeyError("injected")),
    ),
}
NAMES = {"sampling batch": "OverflowError", "finish check": "UnicodeEncodeError"}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_request_that_raises_is_aborted_and_the_others_are_untouched(
    tiny_llama, monkeypatch, fault, overlap
):
    args = dict(disable_overlap_schedule=not overlap)
    clean = run(make_scheduler(tiny_llama, **args), requests())
    sched = make_scheduler(tiny_llama, **args)
    FAULTS[fault](monkeypatch)
    results = run(sched, requests())
    ids, reason = results.pop("bad")
    assert reason["type"] == "abort", reason
    assert NAMES.get(fault, "KeyError") in reason["message"] and "injected" in reason["message"]
    assert results == {rid: clean[rid] for rid in results}  # the others: as without the fault
    assert all(r == {"type": "length", "matched": None} for _, r in results.values())
    after = run(sched, [GenerateRequest("next", [5, 6], SamplingParams(max_new_tokens=3))])
    assert len(after["next"][0]) == 3
    assert_pool_restored(sched)


def test_a_step_whose_every_request_raises_aborts_them_all_and_serves_the_next(
    tiny_llama, monkeypatch
):
    sched = make_scheduler(tiny_llama)
    FAULTS["sampling batch"](monkeypatch)
    bad = [
        GenerateRequest(rid, PROMPTS["bad"], SamplingParams(max_new_tokens=4, **GREEDY))
        for rid in ("bad-1", "bad-2")
    ]
    results = run(sched, bad)
    assert [r["type"] for _, r in results.values()] == ["abort", "abort"]
    after = run(sched, [GenerateRequest("next", [5, 6], SamplingParams(max_new_tokens=3))])
    assert len(after["next"][0]) == 3
    assert_pool_restored(sched)


def test_an_error_no_single_request_explains_propagates(tiny_llama, monkeypatch):
    """A batch that fails while each of its requests builds alone, or a forward that
    fails, is the scheduler's or the device's error: the step raises (and process.py
    fails every request and exits)."""
    sched = make_scheduler(tiny_llama)
    original = sampling_batches.sampling_batch

    def fails_for_batches(reqs, *args):
        if len(reqs) > 1:
            raise RuntimeError("injected: the batch fails")
        return original(reqs, *args)

    monkeypatch.setattr(sampling_batches, "sampling_batch", fails_for_batches)
    with pytest.raises(RuntimeError, match="the batch fails"):
        run(sched, requests())
    monkeypatch.undo()

    sched = make_scheduler(tiny_llama)

    def device_lost(self, batch):
        raise RuntimeError("injected: device lost")

    monkeypatch.setattr(ModelRunner, "forward", device_lost)
    with pytest.raises(RuntimeError, match="device lost"):
        run(sched, requests())


def test_a_request_raising_while_its_jump_forward_draft_is_verified_is_aborted(
    default_model_dir, monkeypatch
):
    """Drafts need a grammar that forces text in a real vocabulary: the default model."""

    def reqs() -> list[GenerateRequest]:
        sp = SamplingParams(max_new_tokens=24, temperature=0, json_schema=json.dumps(PANGRAM))
        return [GenerateRequest(rid, prompt, sp) for rid in ("a", "bad", "b")]

    def scheduler() -> Scheduler:
        args = dict(grammar_backend="xgrammar", enable_jump_forward=True)
        return make_scheduler(default_model_dir, **args)

    sched = scheduler()
    prompt = sched.tokenizer("Write a pangram as JSON.").input_ids
    clean = run(sched, reqs())
    sched = scheduler()
    error = ValueError("injected: verify")
    monkeypatch.setattr(JumpForward, "verify", raising_for_bad(JumpForward.verify, error))
    results = run(sched, reqs())
    assert sched.server_info().jump_forward_draft_tokens_total > 0
    _, reason = results.pop("bad")
    assert reason["type"] == "abort" and "ValueError: injected: verify" in reason["message"]
    assert results == {rid: clean[rid] for rid in results}
    assert_pool_restored(sched)
