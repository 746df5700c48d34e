"""Penalties and bans on a step's logits, in place, before the draw (sampler.py): HF's
repetition penalty, OpenAI's frequency and presence penalties, and the tokens a request
may not sample yet (EOS and stop tokens before min_new_tokens)."""

from __future__ import annotations

import torch

from loom.runtime.sampling.batch import SamplingBatch


def apply_penalties(logits: torch.Tensor, sb: SamplingBatch) -> None:
    if sb.repetition_penalties is not None:
        # HF's rule over prompt and output tokens: divide positive logits, multiply negative.
        pen = sb.repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits.copy_(torch.where(sb.seen_tokens, penalized, logits))
    if sb.frequency_penalties is not None:
        # OpenAI's rule over output tokens: logit -= count * frequency + (count > 0) * presence
        counts = sb.output_counts
        logits -= counts * sb.frequency_penalties[:, None]
        logits -= (counts > 0).float() * sb.presence_penalties[:, None]


def apply_bans(logits: torch.Tensor, sb: SamplingBatch) -> None:
    if sb.banned_rows is not None:
        logits[sb.banned_rows, sb.banned_tokens] = float("-inf")
