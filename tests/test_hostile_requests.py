"""Requests that once killed the scheduler (issue 17): each completes or is refused with a
message that says what to fix, and the scheduler goes on serving with its pool intact."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import InvalidRequestError, SamplingParams
from loom.runtime.sampling.sampler import sample
from loom.runtime.tokenizer.inputs import GenerateInput, InputLimits, expand
from tests.test_models import make_scheduler
from tests.test_sampler import batch_of, make_req
from tests.tiny_models import VOCAB


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.8, seed=2**63),  # past int64: folded
        dict(temperature=0.8, seed=2**64 - 1),
        dict(temperature=0.8, seed=-(2**63)),
        dict(temperature=0.8, top_k=2**63),  # past the vocabulary: no limit
        dict(min_new_tokens=2, stop_token_ids=[VOCAB + 100_000]),  # an id past the logits
    ],
)
def test_out_of_range_values_complete_and_the_scheduler_goes_on(tiny_llama, params):
    sched = make_scheduler(tiny_llama)
    sched.add_request(GenerateRequest("odd", [5, 6, 7], SamplingParams(max_new_tokens=4, **params)))
    sched.add_request(GenerateRequest("next", [8, 9], SamplingParams(max_new_tokens=3)))
    done = {}
    while sched.has_work():
        sched.step()
        done.update({o.rid: o for o in sched.take_outputs() if o.finished_reason is not None})
    for rid in ("odd", "next"):  # both complete: a length limit or an end-of-text token
        assert done[rid].finished_reason["type"] in ("length", "stop"), done[rid]
    info = sched.server_info()
    assert info.available_tokens + info.cache_tokens == info.max_total_tokens


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(stop=["\ud800"]), "lone surrogate"),
        (dict(regex="a\udfffb"), "lone surrogate"),
        (dict(temperature=float("nan")), "finite"),
        (dict(top_p=float("inf")), "finite"),
        (dict(repetition_penalty=float("nan")), "finite"),
        (dict(seed=2**64), "64 bits"),
        (dict(seed=-(2**63) - 1), "64 bits"),
        (dict(stop_token_ids=[2**63]), "vocabulary"),
        (dict(n=1000), "n must be <= 128"),  # once accepted: 1000 sequences from one request
    ],
)
def test_values_no_request_can_have_are_refused_naming_the_field(params, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.from_dict(params)


def test_a_row_whose_every_token_is_masked_still_samples_an_id_of_the_vocabulary():
    """A grammar that no token of the vocabulary can continue masks a whole row: its
    filtered draw once indexed -1 and killed the scheduler (found by tests/
    test_server_fuzz.py). The other rows of the batch sample as ever."""
    vocab = 8
    reqs = [make_req(temperature=1.0, top_k=5), make_req(temperature=1.0, top_p=0.5)]
    reqs += [make_req(temperature=1.0, min_p=0.2), make_req(temperature=1.0, top_k=1)]
    logits = torch.randn(4, vocab)
    logits[:3] = float("-inf")
    tokens = sample(logits.clone(), batch_of(reqs, vocab))
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert tokens[3] == logits[3].argmax()


CONTEXT = 1024
LIMITS = InputLimits(None, CONTEXT, 4096, VOCAB)


def expand_ids(input_ids, sampling_params):
    return expand(GenerateInput(input_ids=input_ids, sampling_params=sampling_params), LIMITS)[0]


def test_max_new_tokens_past_the_context_is_refused_saying_the_most_allowed():
    # once accepted as unbounded (max_new_tokens=10**7)
    with pytest.raises(InvalidRequestError, match="max_new_tokens to at most 1021"):
        expand_ids([5, 6, 7], {"max_new_tokens": 10**7})
    with pytest.raises(InvalidRequestError, match="prompt 1 has 4 tokens"):
        expand_ids([[5, 6, 7], [5, 6, 7, 8]], {"max_new_tokens": CONTEXT - 3})


def test_max_new_tokens_filling_the_context_exactly_or_left_unset_is_accepted():
    (item,) = expand_ids([5, 6, 7], {"max_new_tokens": CONTEXT - 3})
    assert item.request.sampling.max_new_tokens == CONTEXT - 3
    (item,) = expand_ids([5] * (CONTEXT - 1), None)  # the default: cut at the context
    assert item.request.sampling.max_new_tokens == SamplingParams().max_new_tokens
