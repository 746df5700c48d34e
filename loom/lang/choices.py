"""How `select` picks a choice from its tokens' log-probabilities.

Each method sees, per choice, the logprobs of its tokens after the prompt (and, for the
unconditional method, of its tokens with no context) and returns the winning index and
every choice's score. Ties go to the earlier choice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from loom.backends.base import ChoiceScore

_TIE = 1e-5  # the same token after the same context scores the same up to float noise


@dataclass(frozen=True)
class SelectDecision:
    index: int
    scores: tuple[float, ...]
    meta_info: dict


class ChoicesMethod(ABC):
    name: str = ""
    needs_unconditional: bool = False

    @abstractmethod
    def scores(self, logprobs: list[ChoiceScore]) -> list[float]:
        """One score per choice; the highest wins."""

    def decide(self, choices: tuple[str, ...], logprobs: list[ChoiceScore]) -> SelectDecision:
        scores = self.scores(logprobs)
        index = self.winner(logprobs, scores)
        meta = {
            "method": self.name,
            "choices": list(choices),
            "scores": scores,
            "normalized_prompt_logprobs": [_mean(s.logprobs) for s in logprobs],
            "input_token_logprobs": [list(s.logprobs) for s in logprobs],
            "input_tokens": [list(s.tokens) for s in logprobs],
        }
        if self.needs_unconditional:
            meta["unconditional_token_logprobs"] = [list(s.unconditional or ()) for s in logprobs]
        return SelectDecision(index, tuple(scores), meta)

    def winner(self, logprobs: list[ChoiceScore], scores: list[float]) -> int:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    def __repr__(self) -> str:
        return f"loom.{self.name}"


class TokenLengthNormalized(ChoicesMethod):
    """The mean logprob of the choice's tokens: long choices are not penalized for length."""

    name = "token_length_normalized"

    def scores(self, logprobs: list[ChoiceScore]) -> list[float]:
        return [_mean(s.logprobs) for s in logprobs]


class GreedyTokenSelection(ChoicesMethod):
    """What greedy decoding restricted to the choices would write: at each token position
    keep the choices whose token there is the most likely; a choice that is complete while
    others continue wins (greedy decoding has written it out). Scores are the mean logprobs."""

    name = "greedy_token_selection"

    def scores(self, logprobs: list[ChoiceScore]) -> list[float]:
        return [_mean(s.logprobs) for s in logprobs]

    def winner(self, logprobs: list[ChoiceScore], scores: list[float]) -> int:
        remaining = list(range(len(logprobs)))
        step = 0
        while len(remaining) > 1:
            ended = [i for i in remaining if len(logprobs[i].logprobs) <= step]
            if ended:
                return ended[0]
            best = max(logprobs[i].logprobs[step] for i in remaining)
            remaining = [i for i in remaining if logprobs[i].logprobs[step] >= best - _TIE]
            step += 1
        return remaining[0]


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The mean logprob given the prompt minus the mean logprob of the choice alone: how much
    the prompt raises the choice's likelihood (choices that are likely anywhere do not win
    for that alone)."""

    name = "unconditional_likelihood_normalized"
    needs_unconditional = True

    def scores(self, logprobs: list[ChoiceScore]) -> list[float]:
        out = []
        for s in logprobs:
            if s.unconditional is None:
                raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
            out.append(_mean(s.logprobs) - _mean(s.unconditional))
        return out


def _mean(values: Any) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("-inf")


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
