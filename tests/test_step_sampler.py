"""StepSampler on logits in the model's dtype (bf16 on GPUs): a plain greedy batch takes
the argmax of the bf16 logits as they are; any row that needs arithmetic on them
(temperature, penalties) makes the whole batch widen to float32 first, so it samples what
it would from float32 logits of the same values."""

from __future__ import annotations

import torch

from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.sampling import StepSampler

VOCAB = 50


def requests(*params: SamplingParams) -> list[Req]:
    reqs = []
    for i, p in enumerate(params):
        req = Req(f"r{i}", [1, 2, 3], p, seed=7 + i)
        req.req_pool_idx = i
        req.output_ids = [4, 4, 9]  # counted by the frequency penalty
        reqs.append(req)
    return reqs


def sampled(reqs: list[Req], logits: torch.Tensor) -> list[int]:
    sampler = StepSampler(None, VOCAB, {0}, num_rows=8, device="cpu")
    return sampler.queue(reqs, logits).read()


def bf16_logits(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(rows, VOCAB, generator=g) * 4).to(torch.bfloat16)


def test_greedy_batch_reads_bf16_as_is() -> None:
    logits = bf16_logits(3)
    expected = logits.float().argmax(-1).tolist()
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    assert sampled(requests(greedy, greedy, greedy), logits) == expected
    assert logits.dtype == torch.bfloat16


def test_rows_that_need_arithmetic_match_float32() -> None:
    params = (
        SamplingParams(temperature=0, max_new_tokens=8),
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=8),
        SamplingParams(
            temperature=0, frequency_penalty=1.5, presence_penalty=0.5, max_new_tokens=8
        ),
    )
    logits = bf16_logits(3)
    want = sampled(requests(*params), logits.float())
    got = sampled(requests(*params), logits.clone())
    assert got == want
    assert torch.equal(logits, bf16_logits(3))  # the caller's bf16 logits are left alone
