"""select's three choice methods on fixed log-probabilities."""

from __future__ import annotations

import math

import pytest

import loom
from loom.backends.base import ChoiceScore


def scores(*per_choice, uncond=None):
    uncond = uncond or [None] * len(per_choice)
    return [
        ChoiceScore(tuple(lp), None if u is None else tuple(u)) for lp, u in zip(per_choice, uncond)
    ]


def test_token_length_normalized_compares_mean_logprobs():
    # the long choice has the lower sum but the higher mean
    lps = scores([-1.0], [-0.6, -0.6, -0.6])
    d = loom.token_length_normalized.decide(("short", "long one"), lps)
    assert d.index == 1
    assert d.scores == pytest.approx((-1.0, -0.6))
    assert d.meta_info["normalized_prompt_logprobs"] == pytest.approx([-1.0, -0.6])


def test_greedy_token_selection_follows_the_most_likely_token_at_each_step():
    # choice 0 wins the first token even though its mean is far worse
    lps = scores([-0.1, -9.0], [-0.2, -0.1], [-0.3])
    assert loom.greedy_token_selection.decide(("a", "b", "c"), lps).index == 0
    assert loom.token_length_normalized.decide(("a", "b", "c"), lps).index == 1


def test_greedy_shared_prefix_is_decided_by_the_first_differing_token():
    lps = scores([-0.5, -2.0, -0.1], [-0.5, -1.0, -5.0])
    assert loom.greedy_token_selection.decide(("x", "y"), lps).index == 1


def test_greedy_prefers_a_complete_choice_over_its_continuation():
    lps = scores([-0.5, -0.2], [-0.5])
    assert loom.greedy_token_selection.decide(("yes sir", "yes"), lps).index == 1


def test_unconditional_likelihood_normalized_subtracts_the_prior():
    # "the" is likely anywhere; "Paris" is what the prompt makes likely
    lps = scores([-1.0], [-2.0], uncond=[[-0.5], [-6.0]])
    d = loom.unconditional_likelihood_normalized.decide(("the", "Paris"), lps)
    assert d.index == 1
    assert d.scores == pytest.approx((-0.5, 4.0))
    assert d.meta_info["unconditional_token_logprobs"] == [[-0.5], [-6.0]]


def test_ties_go_to_the_earlier_choice():
    lps = scores([-1.0, -1.0], [-1.0, -1.0])
    for method in (loom.token_length_normalized, loom.greedy_token_selection):
        assert method.decide(("a", "b"), lps).index == 0


def test_only_the_unconditional_method_asks_for_unconditional_logprobs():
    assert loom.unconditional_likelihood_normalized.needs_unconditional
    assert not loom.token_length_normalized.needs_unconditional
    assert not loom.greedy_token_selection.needs_unconditional


def test_a_choice_without_tokens_scores_minus_infinity():
    d = loom.token_length_normalized.decide(("a", "b"), scores([], [-3.0]))
    assert d.index == 1 and math.isinf(d.scores[0])
