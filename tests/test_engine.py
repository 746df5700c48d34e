"""The Engine API through its real processes, on a tiny Llama with transformers as reference."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import torch

from loom.backends.base import GenRequest
from loom.backends.engine_backend import EngineBackend
from loom.runtime.engine import Engine, EngineClosedError
from loom.runtime.sampling.params import InvalidRequestError
from tests.http_helpers import wait_until
from tests.tiny_models import VOCAB, hf_greedy, load_reference

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def engine(folder):
    with Engine(folder, device="cpu", max_total_tokens=8192, grammar_backend="none") as e:
        yield e


@pytest.fixture(scope="module")
def hf(folder):
    return load_reference(folder)


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def prompt_ids(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, VOCAB - 2, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 30, (n,), generator=g)
    ]


def test_concurrent_greedy_requests_match_transformers(engine, hf):
    prompts = prompt_ids(8, seed=10)
    results: dict[int, list[int]] = {}

    def submit(i: int) -> None:
        time.sleep(0.05 * i)  # arrive while earlier requests decode
        out = engine.generate(
            input_ids=prompts[i], sampling_params={**GREEDY, "max_new_tokens": 32}
        )
        results[i] = out["output_ids"]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert results[i] == hf_greedy(hf, p, 32), f"prompt {i}"


def test_batch_returns_results_in_order(engine, hf):
    prompts = prompt_ids(3, seed=11)
    outs = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 6})
    assert [o["output_ids"] for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(p) for p in prompts]
    assert all(o["meta_info"]["finish_reason"] == {"type": "length", "matched": None} for o in outs)


def test_text_prompt_matches_its_token_ids(engine):
    ids = prompt_ids(1, seed=12)[0]
    by_text = engine.generate(words(ids), {**GREEDY, "max_new_tokens": 5})
    by_ids = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 5})
    assert by_text["output_ids"] == by_ids["output_ids"]
    assert by_text["text"] == words(by_text["output_ids"])


def test_stop_string_across_token_boundary_is_trimmed(engine):
    ids = prompt_ids(1, seed=13)[0]
    full = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12})
    toks = full["output_ids"]
    stop = f"{str(toks[3])[1:]} t{toks[4]}"  # ends inside token 3's text, spans into token 4
    out = engine.generate(
        input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12, "stop": stop}
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # Generation stops at the first token whose text completes the stop string.
    first = next(k for k in range(1, len(toks) + 1) if stop in words(toks[:k]))
    assert out["output_ids"] == toks[:first]
    assert out["text"] == full["text"][: full["text"].index(stop)]
    kept = engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "max_new_tokens": 12, "stop": stop, "no_stop_trim": True},
    )
    assert kept["text"].endswith(stop)


def test_stop_token_ids_end_generation(engine):
    ids = prompt_ids(1, seed=14)[0]
    toks = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 8})[
        "output_ids"
    ]
    out = engine.generate(
        input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 8, "stop_token_ids": [toks[2]]}
    )
    cut = toks.index(toks[2]) + 1
    assert out["output_ids"] == toks[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": toks[2]}
    assert out["text"] == words(toks[: cut - 1])


def test_streaming_chunks_concatenate_to_the_result(engine):
    ids = prompt_ids(1, seed=15)[0]
    params = {**GREEDY, "max_new_tokens": 10}
    whole = engine.generate(input_ids=ids, sampling_params=params)
    chunks = list(engine.generate(input_ids=ids, sampling_params=params, stream=True))
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum((c["output_ids"] for c in chunks), []) == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_async_generate_and_async_stream(engine):
    ids = prompt_ids(1, seed=16)[0]
    params = {**GREEDY, "max_new_tokens": 6}

    async def run():
        one = await engine.async_generate(input_ids=ids, sampling_params=params)
        stream = await engine.async_generate(input_ids=ids, sampling_params=params, stream=True)
        pieces = [c async for c in stream]
        return one, pieces

    one, pieces = asyncio.run(run())
    assert sum((c["output_ids"] for c in pieces), []) == one["output_ids"]


def test_seeded_sampling_is_reproducible_and_n_gives_n(engine):
    ids = prompt_ids(1, seed=17)[0]
    params = {"temperature": 1.0, "max_new_tokens": 12, "seed": 1234, "ignore_eos": True}
    a = engine.generate(input_ids=ids, sampling_params=params)
    b = engine.generate(input_ids=ids, sampling_params=params)
    assert a["output_ids"] == b["output_ids"]
    many = engine.generate(input_ids=ids, sampling_params={**params, "n": 3})
    assert len(many) == 3
    assert many[0]["output_ids"] == a["output_ids"]  # completion j uses seed + j
    assert len({tuple(o["output_ids"]) for o in many}) > 1


def test_logprobs_match_transformers(engine, hf):
    ids = prompt_ids(1, seed=18)[0]
    out = engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "max_new_tokens": 4},
        return_logprob=True,
        logprob_start_len=2,
        top_logprobs_num=3,
    )
    meta = out["meta_info"]
    seq = ids + out["output_ids"]
    ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0], dim=-1)
    got_in = meta["input_token_logprobs"]
    assert [t for _, t, _ in got_in] == ids[2:]
    for (lp, tok, _), pos in zip(got_in, range(2, len(ids))):
        assert lp == pytest.approx(ref[pos - 1, tok].item(), abs=1e-4)
    for (lp, tok, _), pos in zip(meta["output_token_logprobs"], range(len(ids), len(seq))):
        assert tok == seq[pos]
        assert lp == pytest.approx(ref[pos - 1, tok].item(), abs=1e-4)
    top = meta["output_top_logprobs"][0]
    want = ref[len(ids) - 1].topk(3)
    assert [t for _, t, _ in top] == want.indices.tolist()


def test_prompt_logprobs_only_with_zero_new_tokens(engine, hf):
    ids = prompt_ids(1, seed=19)[0]
    out = engine.generate(
        input_ids=ids,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert out["output_ids"] == []
    lps = out["meta_info"]["input_token_logprobs"]
    assert lps[0][0] is None and len(lps) == len(ids)
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    assert lps[-1][0] == pytest.approx(ref[len(ids) - 2, ids[-1]].item(), abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        # once accepted as unbounded: past the context it is a 400 saying the most allowed
        (dict(sampling_params={"max_new_tokens": 10**7}), "lower max_new_tokens to at most 1021"),
        (dict(sampling_params={"top_p": 0}), "top_p"),
        (dict(sampling_params={"top_p": 1.5}), "top_p"),
        (dict(sampling_params={"temperature": -0.1}), "temperature"),
        (dict(sampling_params={"max_tokens": 5}), "unknown sampling parameter"),
        (dict(sampling_params={"stop_regex": ["x+"]}), "stop_regex is not supported"),
        (dict(sampling_params={"temperature": "hot"}), "temperature"),
        (dict(input_ids=[5] * 2000), "context length"),
        (dict(input_ids=[]), "input_ids"),
        (dict(prompt=""), "empty"),
        (dict(input_ids=[5, VOCAB + 7]), "outside"),
        (dict(input_ids=[5, -1]), "outside"),
        (dict(input_ids=[5, True]), "input_ids"),  # a bool is not a token id
        (dict(input_ids=[[5, 6], [7, "8"]]), "integers"),
        (dict(input_ids=[5, 6], top_logprobs_num=-2), "top_logprobs_num"),
        (dict(prompt="a\ud800b"), "lone surrogate"),  # once a 500 from the tokenizer
        (dict(input_ids=[5, 6], rid="job-\udfff"), "rid"),
        (dict(input_ids=[5, 6], rid=7), "rid"),
    ],
)
def test_bad_input_is_rejected_and_engine_keeps_serving(engine, kwargs, message):
    call = {"input_ids": [5, 6, 7], **kwargs}
    if "prompt" in call:
        call.pop("input_ids")
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(**call)
    ok = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 2})
    assert len(ok["output_ids"]) == 2


def test_idle_engine_holds_no_kv_outside_the_cache(engine):
    info = engine.get_server_info()
    assert info.running_requests == 0 and info.waiting_requests == 0
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens
    assert engine.flush_cache().ok
    assert engine.get_server_info().available_tokens == info.max_total_tokens


# ---- a shut-down engine fails fast -----------------------------------------------------

CLOSED = "this Engine has been shut down; create a new one"
HANG_GUARD_S = 120  # only a hang reaches this; a passing call returns at once


def error_of(call) -> BaseException | None:
    """What `call` raised, run on a thread joined with a bound: a call that hangs fails the
    test instead of stalling the run."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the call hung"
    return outcome[0]


@pytest.fixture(scope="module")
def closed_engine(folder):
    e = Engine(folder, device="cpu", max_total_tokens=1024, grammar_backend="none")
    served = e.generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 1})
    assert len(served["output_ids"]) == 1  # it worked before shutdown
    e.shutdown()
    return e


def _async_generate(engine: Engine, **kw):
    return asyncio.run(engine.async_generate(input_ids=[5, 6], **kw))


def _async_stream(engine: Engine):
    async def run():
        return [c async for c in await engine.async_generate(input_ids=[5, 6], stream=True)]

    return asyncio.run(run())


CALLS = {
    "generate": lambda e: e.generate(input_ids=[5, 6]),
    "generate a batch": lambda e: e.generate(input_ids=[[5, 6], [7]]),
    "generate stream=True": lambda e: e.generate(input_ids=[5, 6], stream=True),
    "async_generate": _async_generate,
    "async_generate stream=True": _async_stream,
    "get_server_info": lambda e: e.get_server_info(),
    "flush_cache": lambda e: e.flush_cache(),
    "loop": lambda e: e.loop,
    "EngineBackend.generate": lambda e: EngineBackend(e).generate(
        GenRequest("t5", {"max_new_tokens": 1})
    ),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_every_call_on_a_shut_down_engine_raises_at_once(closed_engine, call):
    error = error_of(lambda: call(closed_engine))
    assert isinstance(error, EngineClosedError) and str(error) == CLOSED


def test_shutdown_is_idempotent(closed_engine):
    assert error_of(closed_engine.shutdown) is None
    with closed_engine:  # leaving the block shuts it down once more
        pass


def test_a_stream_begun_before_shutdown_raises_on_its_next_chunk(folder):
    e = Engine(folder, device="cpu", max_total_tokens=1024, grammar_backend="none")
    chunks = e.generate(
        input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 8}, stream=True
    )
    assert len(next(chunks)["output_ids"]) == 1
    e.shutdown()
    error = error_of(lambda: next(chunks))
    assert isinstance(error, EngineClosedError)


def test_calls_in_flight_when_the_engine_shuts_down_fail_with_the_closed_error(folder):
    """The scheduler is stopped (SIGSTOP), so both calls are certainly still waiting for
    their answers when shutdown begins: they fail with the closed error, not hang."""
    e = Engine(folder, device="cpu", max_total_tokens=1024, grammar_backend="none")
    scheduler = e.process_ids["scheduler"]
    params = {**GREEDY, "max_new_tokens": 4}
    errors: dict[str, BaseException | None] = {}

    def sync_call() -> None:
        errors["generate"] = error_of(
            lambda: e.generate(input_ids=[5, 6], sampling_params=params, rid="sync")
        )

    def async_call() -> None:
        errors["async_generate"] = error_of(
            lambda: _async_generate(e, sampling_params=params, rid="async")
        )

    os.kill(scheduler, signal.SIGSTOP)
    callers = [threading.Thread(target=f) for f in (sync_call, async_call)]
    stopper = threading.Thread(target=e.shutdown)
    try:
        for t in callers:
            t.start()
        assert wait_until(lambda: {"sync", "async"} <= e.manager.states.keys(), HANG_GUARD_S)
        stopper.start()
        for t in callers:
            t.join()
        assert set(errors) == {"generate", "async_generate"}
        assert all(isinstance(err, EngineClosedError) for err in errors.values()), errors
    finally:
        os.kill(scheduler, signal.SIGCONT)
    stopper.join(HANG_GUARD_S)
    assert not stopper.is_alive()
