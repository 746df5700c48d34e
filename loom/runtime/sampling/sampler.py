"""Turns a batch's logits into next tokens, on the logits' device.

Order: penalties -> min_new_tokens mask -> grammar mask -> greedy or sampled.
Sampling: temperature, then top-k, then top-p on the renormalized top-k distribution,
then min-p relative to the most likely token. The random draw is one uniform number per
request per step, hashed from (seed, step) on the device, so a seeded request samples the
same tokens whatever batch it lands in, and no host round trip is needed for it.
"""

from __future__ import annotations

import torch

from loom.runtime.sampling.batch import SamplingBatch
from loom.runtime.sampling.penalties import apply_bans

_MASK32 = 0xFFFFFFFF


def filter_probs(
    probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (descending) probabilities with the filtered-out ones zeroed, and the order."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    sorted_probs = sorted_probs.masked_fill(ranks >= top_ks[:, None], 0.0)
    renorm = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it
    # is still below top_p (so the first token always stays).
    # top_p = 1 keeps all: the float32 running mass can round up to 1 before the tail.
    mass_before = renorm.cumsum(dim=-1) - renorm
    drop = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    threshold = sorted_probs[:, :1] * min_ps[:, None]
    sorted_probs = sorted_probs.masked_fill(sorted_probs < threshold, 0.0)
    return sorted_probs, order


def uniform_from_seed(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per row, a pure function of (seed, step)."""
    x = _hash32((seeds & _MASK32) ^ _hash32(steps * 0x9E3779B1 + (seeds >> 32)))
    y = _hash32(x ^ 0x5BD1E995)
    # 24 + 24 bits of two hashes -> a float64 in [0, 1).
    return ((x >> 8).double() * 16777216.0 + (y >> 8).double()) / 281474976710656.0


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finalizer (xorshift-multiply); int64 math, masked to 32 bits.
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Next token per row (int64). `logits` is modified in place."""
    apply_bans(logits, sb)
    greedy = logits.argmax(dim=-1)
    if sb.all_greedy:
        return greedy
    temps = sb.temperatures.clamp_min(1e-6)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    u = uniform_from_seed(sb.seeds, sb.steps)
    # A row draws in vocab order, or in sorted order when it filters: the order depends on
    # the row's own settings only, so its draw does not depend on the rest of the batch.
    sampled = _draw(probs, u)
    if sb.need_top_k or sb.need_top_p or sb.need_min_p:
        sorted_probs, order = filter_probs(probs, sb.top_ks, sb.top_ps, sb.min_ps)
        picked = _draw(sorted_probs, u)
        # searchsorted can land on a zeroed (filtered) entry only through rounding at its
        # edge: step back to the last kept token then. A row that keeps none (a grammar
        # no token can continue masks it all, its probabilities NaN) takes its first:
        # the grammar then refuses it, and that request alone is aborted.
        kept = sorted_probs.gather(1, picked[:, None]).squeeze(-1) > 0
        last_kept = ((sorted_probs > 0).sum(-1) - 1).clamp_min_(0)
        picked = torch.where(kept, picked, last_kept)
        filters = (sb.top_ks < probs.shape[-1]) | (sb.top_ps < 1) | (sb.min_ps > 0)
        sampled = torch.where(filters, order.gather(1, picked[:, None]).squeeze(-1), sampled)
    return torch.where(sb.temperatures == 0, greedy, sampled)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the running mass passes u times the row's total mass."""
    cdf = probs.double().cumsum(dim=-1)
    index = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    return index.clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
