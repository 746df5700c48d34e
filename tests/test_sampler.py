"""The sampler against plain references: sorted lists for top-k / top-p / min-p, numpy
softmax for the sampled distribution, transformers' RepetitionPenaltyLogitsProcessor and
OpenAI's formula for penalties, log_softmax for logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import RepetitionPenaltyLogitsProcessor

from loom.runtime.sampling.batch import sampling_batch
from loom.runtime.sampling.logprobs import token_logprobs
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.sampling.penalties import apply_penalties
from loom.runtime.sampling.sampler import filter_probs, sample, uniform_from_seed
from loom.runtime.scheduler.request import Req

CPU = torch.device("cpu")
EOS = 3


def make_req(prompt=(5, 6), output=(), seed=0, **params) -> Req:
    req = Req("r", list(prompt), SamplingParams(**params), seed=seed)
    req.output_ids = list(output)
    req.pending = 1  # the token about to be sampled, as the scheduler counts it
    return req


def batch_of(reqs: list[Req], vocab: int, eos_ids=frozenset({EOS})):
    return sampling_batch(reqs, vocab, CPU, set(eos_ids))


def reference_kept(
    probs: list[float], top_k: int, top_p: float, min_p: float, slack: float = 0.0
) -> set[int]:
    """Top-k keeps the k most likely; top-p keeps the smallest head of the renormalized top-k
    whose mass reaches top_p; min-p drops tokens below min_p * max. `slack` widens the
    top-p and min-p boundaries (a superset, for float32 rounding at the edges)."""
    ranked = sorted(range(len(probs)), key=lambda t: -probs[t])[:top_k]
    total = sum(probs[t] for t in ranked)
    kept: list[int] = []
    mass = 0.0
    for t in ranked:
        if mass >= top_p + slack and top_p < 1:
            break
        kept.append(t)
        mass += probs[t] / total
    top = probs[kept[0]]
    return {t for t in kept if probs[t] >= (min_p - slack) * top}


def kept_ids(probs: torch.Tensor, top_ks, top_ps, min_ps) -> list[set[int]]:
    sorted_probs, order = filter_probs(
        probs,
        torch.tensor(top_ks, dtype=torch.int64),
        torch.tensor(top_ps, dtype=torch.float32),
        torch.tensor(min_ps, dtype=torch.float32),
    )
    return [set(o[s > 0].tolist()) for s, o in zip(sorted_probs, order)]


def near_boundary(probs: list[float], top_k: int, top_p: float, min_p: float) -> bool:
    """Whether float32 rounding could decide a token at the top-p or min-p edge."""
    ranked = sorted(probs, reverse=True)[:top_k]
    total = sum(ranked)
    mass_before = np.cumsum([0.0] + ranked[:-1]) / total
    top_p_edge = top_p < 1 and bool(np.any(np.abs(mass_before - top_p) < 1e-5))
    min_p_edge = any(abs(p - min_p * ranked[0]) <= 1e-6 * ranked[0] for p in ranked)
    return top_p_edge or min_p_edge


# ---- filter_probs --------------------------------------------------------------------------


@st.composite
def filter_rows(draw):
    vocab = draw(st.integers(2, 40))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        weights = draw(st.lists(st.floats(0.01, 1.0), min_size=vocab, max_size=vocab, unique=True))
        top_k = draw(st.one_of(st.just(vocab), st.integers(1, vocab)))
        top_p = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
        min_p = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
        rows.append((weights, top_k, top_p, min_p))
    return rows


@settings(max_examples=150, deadline=None)
@given(filter_rows())
def test_filter_probs_keeps_the_reference_set(rows):
    probs = torch.tensor([w for w, *_ in rows], dtype=torch.float64)
    probs = (probs / probs.sum(-1, keepdim=True)).float()
    top_ks, top_ps, min_ps = ([r[i] for r in rows] for i in (1, 2, 3))
    # The reference sees exactly the float32 inputs filter_probs sees.
    top_ps = torch.tensor(top_ps, dtype=torch.float32).tolist()
    min_ps = torch.tensor(min_ps, dtype=torch.float32).tolist()
    rows_probs = probs.tolist()
    for row, k, p, mp in zip(rows_probs, top_ks, top_ps, min_ps):
        assume(len(set(row)) == len(row))  # ties make "the k most likely" a choice
        assume(not near_boundary(row, k, p, mp))
    got = kept_ids(probs, top_ks, top_ps, min_ps)
    for row_probs, k, p, mp, kept in zip(rows_probs, top_ks, top_ps, min_ps, got):
        assert kept == reference_kept(row_probs, k, p, mp)


def test_filter_probs_top_p_one_keeps_every_top_k_token():
    # Peaked rows over a long vocabulary: the float32 running mass rounds up to 1.0 before
    # the tail is reached, which must not cut the tail.
    vocab = 32000
    probs = torch.softmax(random_logits(8, vocab, 0), -1)
    top_ks = [vocab] * 6 + [500, 1]
    got = kept_ids(probs, top_ks, [1.0] * 8, [0.0] * 8)
    assert [len(k) for k in got] == top_ks
    assert got[6] == set(probs[6].topk(500).indices.tolist())


def test_filter_probs_top_k_one_keeps_only_argmax():
    probs = torch.softmax(torch.randn(8, 30, generator=torch.Generator().manual_seed(1)), -1)
    got = kept_ids(probs, [1] * 8, [1.0] * 8, [0.0] * 8)
    assert got == [{int(i)} for i in probs.argmax(-1)]


def test_filter_probs_top_p_keeps_the_smallest_head_reaching_it():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])  # exact in binary
    assert kept_ids(probs, [4], [0.01], [0.0]) == [{0}]  # the first token always stays
    assert kept_ids(probs, [4], [0.5], [0.0]) == [{0}]  # 0.5 reaches 0.5 exactly
    assert kept_ids(probs, [4], [0.6], [0.0]) == [{0, 1}]
    assert kept_ids(probs, [4], [0.75], [0.0]) == [{0, 1}]
    assert kept_ids(probs, [4], [0.8], [0.0]) == [{0, 1, 2}]


def test_filter_probs_top_p_applies_to_the_renormalized_top_k():
    # Top-2 renormalized: [0.5, 0.5]; top_p 0.5 then keeps one token, though 0.4 < 0.5.
    probs = torch.tensor([[0.4, 0.4, 0.2]])
    (kept,) = kept_ids(probs, [2], [0.5], [0.0])
    assert len(kept) == 1 and kept <= {0, 1}
    assert kept_ids(probs, [2], [0.51], [0.0]) == [{0, 1}]


def test_filter_probs_with_ties_keeps_k_of_the_tied():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3]])
    (kept,) = kept_ids(probs, [2], [1.0], [0.0])
    assert len(kept) == 2 and kept <= {1, 2, 3}
    # min_p = 1 keeps every token tied with the most likely one, and only those.
    assert kept_ids(probs, [4], [1.0], [1.0]) == [{1, 2, 3}]


def test_filter_probs_min_p_is_relative_to_the_most_likely():
    probs = torch.tensor([[0.5, 0.26, 0.24]])
    assert kept_ids(probs, [3], [1.0], [0.5]) == [{0, 1}]
    assert kept_ids(probs, [3], [1.0], [0.0]) == [{0, 1, 2}]
    # A token exactly at min_p * max is not below it: it stays.
    assert kept_ids(torch.tensor([[0.5, 0.25, 0.25]]), [3], [1.0], [0.5]) == [{0, 1, 2}]


# ---- sample: greedy and filtered rows ------------------------------------------------------


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_row_returns_argmax_in_a_mixed_batch():
    logits = random_logits(6, 50, 0)
    reqs = [make_req(seed=i, temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    tokens = sample(logits.clone(), batch_of(reqs, 50, ()))
    argmax = logits.argmax(-1)
    assert [tokens[i] == argmax[i] for i in (1, 3, 5)] == [True] * 3


def test_all_greedy_batch_returns_argmax():
    logits = random_logits(5, 50, 1)
    sb = batch_of([make_req(seed=i, temperature=0.0) for i in range(5)], 50, ())
    assert sb.all_greedy
    assert sample(logits.clone(), sb).tolist() == logits.argmax(-1).tolist()


def test_top_k_one_at_temperature_one_returns_argmax():
    logits = random_logits(16, 50, 2)
    sb = batch_of([make_req(seed=i, temperature=1.0, top_k=1) for i in range(16)], 50, ())
    assert sample(logits.clone(), sb).tolist() == logits.argmax(-1).tolist()


def test_sampled_tokens_lie_in_the_kept_set():
    vocab = 40
    rng = np.random.default_rng(3)
    for trial in range(40):
        logits = random_logits(32, vocab, 100 + trial)
        logits[:, rng.integers(vocab)] = float("-inf")  # a banned token is never drawn
        reqs = [
            make_req(
                seed=int(rng.integers(2**40)),
                output=[7] * int(rng.integers(5)),
                temperature=float(rng.choice([0.3, 1.0, 1.7])),
                top_k=int(rng.choice([-1, 1, 3, 10])),
                top_p=float(rng.choice([1.0, 0.9, 0.5, 0.1])),
                min_p=float(rng.choice([0.0, 0.05, 0.3])),
            )
            for _ in range(32)
        ]
        tokens = sample(logits.clone(), batch_of(reqs, vocab, ()))
        for row, req in enumerate(reqs):
            p = req.sampling
            probs = torch.softmax(logits[row].double() / p.temperature, -1).tolist()
            top_k = p.top_k if p.top_k > 0 else vocab
            allowed = reference_kept(probs, top_k, p.top_p, p.min_p, slack=1e-5)
            assert int(tokens[row]) in {t for t in allowed if probs[t] > 0}


# ---- sample: the distribution ------------------------------------------------------------


def chi_square(tokens: torch.Tensor, expected: np.ndarray) -> float:
    counts = np.bincount(tokens.numpy(), minlength=len(expected))
    exp = expected * len(tokens)
    return float(((counts - exp) ** 2 / exp).sum())


# Chi-square with 3 degrees of freedom exceeds 25 with probability ~1.6e-5.
CHI2_BOUND_3DF = 25.0
LOGITS_4 = [1.0, 0.5, -0.3, 0.2]


def softmax_np(logits, temperature: float) -> np.ndarray:
    z = np.exp(np.array(logits) / temperature)
    return z / z.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_over_steps_follow_softmax_of_logits_over_temperature(temperature):
    n = 20000
    sb = batch_of([make_req(seed=1234, temperature=temperature) for _ in range(n)], 4, ())
    sb.steps = torch.arange(n)  # one request's steps 0..n-1, drawn side by side
    tokens = sample(torch.tensor([LOGITS_4] * n), sb)
    assert chi_square(tokens, softmax_np(LOGITS_4, temperature)) < CHI2_BOUND_3DF


def test_draws_over_seeds_follow_the_distribution():
    n = 20000
    sb = batch_of([make_req(seed=s) for s in range(n)], 4, ())
    tokens = sample(torch.tensor([LOGITS_4] * n), sb)
    assert chi_square(tokens, softmax_np(LOGITS_4, 1.0)) < CHI2_BOUND_3DF


def test_top_k_draws_follow_the_renormalized_head():
    n = 20000
    sb = batch_of([make_req(seed=s, top_k=2) for s in range(n)], 4, ())
    tokens = sample(torch.tensor([LOGITS_4] * n), sb)
    probs = softmax_np(LOGITS_4, 1.0)
    head = np.zeros(4)
    head[[0, 1]] = probs[[0, 1]] / probs[[0, 1]].sum()
    counts = np.bincount(tokens.numpy(), minlength=4)
    assert counts[2] == counts[3] == 0
    # One degree of freedom: above 20 with probability ~8e-6.
    assert chi_square(tokens[tokens < 2], head[:2]) < 20.0


# ---- seeds ---------------------------------------------------------------------------------


def test_seeded_draw_does_not_depend_on_the_batch():
    vocab = 64
    row_logits = random_logits(1, vocab, 7)[0]
    for params in ({}, {"top_k": 5}, {"top_p": 0.8, "min_p": 0.05}, {"temperature": 0.7}):
        for seed in range(20):
            alone = sample(
                row_logits[None].clone(), batch_of([make_req(seed=seed, **params)], vocab, ())
            )
            others = [
                make_req(seed=999, top_k=3),
                make_req(seed=5, top_p=0.5),
                make_req(seed=6, temperature=0.0),
                make_req(seed=8, min_p=0.2),
            ]
            for position in (0, 2, 4):
                reqs = others[:position] + [make_req(seed=seed, **params)] + others[position:]
                logits = random_logits(len(reqs), vocab, seed)
                logits[position] = row_logits
                tokens = sample(logits, batch_of(reqs, vocab, ()))
                assert tokens[position] == alone[0], (params, seed, position)


def test_same_seed_and_step_draw_the_same_token():
    logits = random_logits(1, 64, 8).repeat(2, 1)
    reqs = [make_req(seed=42, output=[1, 2, 3]), make_req(seed=42, output=[4, 5, 6])]
    tokens = sample(logits, batch_of(reqs, 64, ()))
    assert tokens[0] == tokens[1]


def test_different_seeds_draw_differently():
    n = 200
    logits = torch.zeros(n, 1000)  # uniform over 1000 tokens
    tokens = sample(logits, batch_of([make_req(seed=s) for s in range(n)], 1000, ()))
    # 200 draws of a fair 1000-sided die: ~20 collisions expected, not 199.
    assert len(set(tokens.tolist())) > 150


def test_uniform_from_seed_is_uniform_in_unit_interval():
    n = 10000
    for seeds, steps in [
        (torch.arange(n), torch.zeros(n, dtype=torch.int64)),
        (torch.full((n,), 2**40 + 17), torch.arange(n)),
        (torch.arange(n) * 2**33, torch.full((n,), 3)),  # seeds differing in high bits only
    ]:
        u = uniform_from_seed(seeds, steps)
        assert u.dtype == torch.float64
        assert bool(((u >= 0) & (u < 1)).all())
        assert abs(float(u.mean()) - 0.5) < 0.01  # std of the mean is 0.0029
        assert len(set(u.tolist())) == n
        deciles = np.bincount((u.numpy() * 10).astype(int), minlength=10)
        assert deciles.min() > 900 and deciles.max() < 1100


def test_uniform_from_seed_is_a_pure_function():
    seeds = torch.tensor([0, 1, 2**35, 7])
    steps = torch.tensor([0, 5, 5, 1000])
    first = uniform_from_seed(seeds, steps)
    again = uniform_from_seed(seeds.flip(0), steps.flip(0)).flip(0)
    assert first.tolist() == again.tolist()


# ---- penalties -----------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers():
    vocab = 30
    reqs = [
        make_req(prompt=[1, 2, 2, 7], output=[9, 1], repetition_penalty=1.3),
        make_req(prompt=[4], output=[], repetition_penalty=0.7),
        make_req(prompt=[5, 6], output=[28, 29, 29], repetition_penalty=2.0),
        make_req(prompt=[3, 8], output=[11], repetition_penalty=1.0),
    ]
    logits = random_logits(len(reqs), vocab, 9)
    logits[0, 2] = 0.0  # a zero logit is left at zero either way
    expected = []
    for row, req in enumerate(reqs):
        proc = RepetitionPenaltyLogitsProcessor(penalty=req.sampling.repetition_penalty)
        ids = torch.tensor([req.origin_input_ids + req.output_ids])
        expected.append(proc(ids, logits[row : row + 1].clone())[0])
    got = logits.clone()
    apply_penalties(got, batch_of(reqs, vocab))
    torch.testing.assert_close(got, torch.stack(expected))


def test_frequency_and_presence_penalties_follow_openai_over_output_tokens():
    vocab = 20
    reqs = [
        make_req(prompt=[1, 1, 2], output=[2, 2, 5, 7, 2], frequency_penalty=0.5),
        make_req(prompt=[3, 4], output=[3, 6, 6], presence_penalty=1.5),
        make_req(prompt=[8], output=[8, 9, 9, 9], frequency_penalty=-0.4, presence_penalty=0.3),
        make_req(prompt=[10], output=[]),
    ]
    logits = random_logits(len(reqs), vocab, 10)
    expected = logits.clone()
    for row, req in enumerate(reqs):
        p = req.sampling
        for token in range(vocab):
            count = req.output_ids.count(token)  # prompt tokens do not count
            expected[row, token] -= count * p.frequency_penalty + (count > 0) * p.presence_penalty
    got = logits.clone()
    apply_penalties(got, batch_of(reqs, vocab))
    torch.testing.assert_close(got, expected)


def test_repetition_then_frequency_penalties_combine():
    vocab = 12
    req = make_req(prompt=[1, 2], output=[2, 3, 3], repetition_penalty=1.5, frequency_penalty=0.25)
    logits = random_logits(1, vocab, 11)
    expected = logits[0].tolist()
    for token in range(vocab):
        if token in req.fill_ids:
            expected[token] = (
                expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
            )
        expected[token] -= req.output_ids.count(token) * 0.25
    got = logits.clone()
    apply_penalties(got, batch_of([req], vocab))
    torch.testing.assert_close(got[0], torch.tensor(expected))


def test_no_penalty_tensors_without_penalties():
    sb = batch_of([make_req(output=[1, 2]), make_req(temperature=0.0)], 10)
    assert sb.repetition_penalties is None and sb.frequency_penalties is None
    logits = random_logits(2, 10, 12)
    got = logits.clone()
    apply_penalties(got, sb)
    assert torch.equal(got, logits)


# ---- min_new_tokens ------------------------------------------------------------------------


def banned_pairs(sb) -> set[tuple[int, int]]:
    if sb.banned_rows is None:
        return set()
    return set(zip(sb.banned_rows.tolist(), sb.banned_tokens.tolist()))


def test_min_new_tokens_bans_eos_and_stop_tokens_until_reached():
    vocab = 16
    eos_ids = {EOS, 15}
    for produced in range(5):
        req = make_req(output=[7] * produced, min_new_tokens=3, stop_token_ids=[11])
        sb = batch_of([req], vocab, eos_ids)
        expected = {(0, t) for t in (EOS, 15, 11)} if produced < 3 else set()
        assert banned_pairs(sb) == expected, produced


def test_min_new_tokens_with_ignore_eos_bans_only_stop_tokens():
    req = make_req(output=[7], min_new_tokens=3, stop_token_ids=[11, 12], ignore_eos=True)
    assert banned_pairs(batch_of([req], 16, {EOS})) == {(0, 11), (0, 12)}


def test_banned_tokens_are_minus_infinity_and_never_sampled():
    vocab = 16
    reqs = [
        make_req(output=[], min_new_tokens=2, stop_token_ids=[11], temperature=0.0),
        make_req(output=[7, 7], min_new_tokens=2, stop_token_ids=[11], temperature=0.0),
        make_req(output=[], min_new_tokens=2, seed=4),
    ]
    logits = torch.zeros(3, vocab)
    logits[:, EOS] = 50.0  # EOS (then the stop token) would win everywhere
    logits[:, 11] = 40.0
    tokens = sample(logits, batch_of(reqs, vocab, {EOS}))
    assert logits[0, EOS] == float("-inf") and logits[0, 11] == float("-inf")
    assert logits[2, EOS] == float("-inf") and logits[2, 11] == 40.0  # row 2 has no stop ids
    assert math.isfinite(float(logits[1, EOS])) and tokens[1] == EOS  # min reached: no ban
    assert int(tokens[0]) not in (EOS, 11)
    assert tokens[2] == 11


# ---- logprobs ------------------------------------------------------------------------------


def test_token_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(5, 40, 13)
    ids = torch.tensor([0, 39, 7, 7, 20])
    chosen, values, top_ids = token_logprobs(logits, ids, top_k=6)
    ref = logits.double().numpy()
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen.numpy(), ref[np.arange(5), ids.numpy()], rtol=0, atol=1e-5)
    for row in range(5):
        order = sorted(range(40), key=lambda t: -ref[row, t])[:6]
        assert top_ids[row].tolist() == order
        assert values[row].tolist() == sorted(values[row].tolist(), reverse=True)
        np.testing.assert_allclose(values[row].numpy(), ref[row, order], rtol=0, atol=1e-5)


def test_token_logprobs_without_top_k_and_with_top_k_over_vocab():
    logits = random_logits(2, 5, 14)
    chosen, values, top_ids = token_logprobs(logits, torch.tensor([1, 2]), top_k=0)
    assert values is None and top_ids is None and chosen.shape == (2,)
    _, values, top_ids = token_logprobs(logits, torch.tensor([1, 2]), top_k=10)
    assert values.shape == (2, 5) and sorted(top_ids[0].tolist()) == list(range(5))
