"""The per-step sampling batch: each row's sampling settings, penalties and bans as device
tensors, built from the step's requests in a few uploads that never wait for the device
(host_copy.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loom.runtime.executor.host_copy import to_device
from loom.runtime.sampling.params import SamplingParams


class SamplingRequest(Protocol):
    """What the batch reads of a scheduled request (the scheduler's Req)."""

    @property
    def sampling(self) -> SamplingParams: ...
    @property
    def seed(self) -> int: ...
    @property
    def fill_ids(self) -> list[int]: ...
    @property
    def output_ids(self) -> list[int]: ...
    @property
    def pending(self) -> int: ...


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors (built once per step by sampling_batch)."""

    all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    # Per-row settings; None when every row is greedy (argmax reads none of them).
    temperatures: torch.Tensor | None = None  # (bs,) float32; 0 = greedy
    top_ks: torch.Tensor | None = None  # (bs,) int64; vocab size = disabled
    top_ps: torch.Tensor | None = None  # (bs,) float32
    min_ps: torch.Tensor | None = None  # (bs,) float32
    seeds: torch.Tensor | None = None  # (bs,) int64
    steps: torch.Tensor | None = None  # (bs,) int64: tokens already generated
    # Penalties (None when no row uses them).
    repetition_penalties: torch.Tensor | None = None  # (bs,)
    frequency_penalties: torch.Tensor | None = None  # (bs,)
    presence_penalties: torch.Tensor | None = None  # (bs,)
    output_counts: torch.Tensor | None = None  # (bs, vocab) counts of generated tokens
    seen_tokens: torch.Tensor | None = None  # (bs, vocab) bool: in prompt or output
    # (row, token) pairs to forbid this step (min_new_tokens not reached: EOS and stops).
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None


def sampling_batch(
    reqs: list[SamplingRequest], vocab_size: int, device: torch.device, eos_ids: set[int]
) -> SamplingBatch:
    """Each request samples its output token number len(output_ids) + pending - 1 (pending
    counts the token being sampled)."""
    params = [r.sampling for r in reqs]
    temps = [p.temperature for p in params]
    top_ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    all_greedy = all(t == 0 for t in temps)
    sb = SamplingBatch(
        all_greedy=all_greedy,
        need_top_k=any(k < vocab_size for k in top_ks),
        need_top_p=any(p.top_p < 1 for p in params),
        need_min_p=any(p.min_p > 0 for p in params),
    )
    if not all_greedy:  # greedy rows read none of the per-row settings
        floats = to_device(
            [temps, [p.top_p for p in params], [p.min_p for p in params]], torch.float32, device
        )
        ints = to_device(
            [top_ks, [r.seed for r in reqs], [len(r.output_ids) + r.pending - 1 for r in reqs]],
            torch.int64,
            device,
        )
        sb.temperatures, sb.top_ps, sb.min_ps = floats
        sb.top_ks, sb.seeds, sb.steps = ints
    _add_penalties(sb, reqs, vocab_size, device)
    _add_min_tokens_bans(sb, reqs, vocab_size, device, eos_ids)
    return sb


def _add_penalties(sb: SamplingBatch, reqs: list[SamplingRequest], vocab: int, device) -> None:
    """Per-row token sets and counts for the penalties, uploaded from pinned memory in one
    copy each (a per-row upload from a list waits for the running forward)."""
    params = [r.sampling for r in reqs]
    if any(p.repetition_penalty != 1.0 for p in params):
        rows, ids = _row_tokens([r.fill_ids for r in reqs], vocab)
        seen = torch.zeros((len(reqs), vocab), dtype=torch.bool, device=device)
        if rows:
            at = to_device([rows, ids], torch.int64, device)
            seen[at[0], at[1]] = True
        sb.seen_tokens = seen
        sb.repetition_penalties = to_device(
            [p.repetition_penalty for p in params], torch.float32, device
        )
    if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
        rows, ids = _row_tokens([r.output_ids for r in reqs], vocab)
        counts = torch.zeros((len(reqs), vocab), dtype=torch.float32, device=device)
        if rows:
            at = to_device([rows, ids], torch.int64, device)
            ones = torch.ones(len(rows), dtype=torch.float32, device=device)
            counts.index_put_((at[0], at[1]), ones, accumulate=True)
        sb.output_counts = counts
        sb.frequency_penalties, sb.presence_penalties = to_device(
            [[p.frequency_penalty for p in params], [p.presence_penalty for p in params]],
            torch.float32,
            device,
        )


def _row_tokens(per_row: list[list[int]], vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs of each row's tokens below vocab, as two flat lists."""
    rows, ids = [], []
    for row, tokens in enumerate(per_row):
        kept = [t for t in tokens if t < vocab]
        rows += [row] * len(kept)
        ids += kept
    return rows, ids


def _add_min_tokens_bans(
    sb: SamplingBatch, reqs: list[SamplingRequest], vocab_size: int, device, eos_ids: set[int]
) -> None:
    rows, tokens = [], []
    for row, req in enumerate(reqs):
        p = req.sampling
        if len(req.output_ids) + req.pending - 1 >= p.min_new_tokens:
            continue
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
        banned = {t for t in banned if t < vocab_size}  # an id past the logits is never sampled
        rows.extend([row] * len(banned))
        tokens.extend(sorted(banned))
    if rows:
        sb.banned_rows, sb.banned_tokens = to_device([rows, tokens], torch.int64, device)
