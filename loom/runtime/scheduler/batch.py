"""Builds the executor's inputs (ForwardBatch, SamplingBatch) from scheduled requests.

Each builder assumes the requests' KV slots for the new tokens are already allocated
and written into req_to_token; it only gathers tensors.
"""

from __future__ import annotations

import torch

from loom.runtime.executor.host_copy import to_device
from loom.runtime.executor.sampler import SamplingBatch
from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.memory.req_to_token import ReqToTokenPool
from loom.runtime.scheduler.request import Req


def extend_batch(
    reqs: list[Req],
    starts: list[int],
    pool: ReqToTokenPool,
    device: torch.device,
    last_tokens: torch.Tensor | None = None,
    riders: int = 0,
) -> ForwardBatch:
    """Tokens fill_ids[start : req.kv_len] of each request; starts are the cached lengths.
    The last `riders` requests are running ones decoding in the same forward: one token
    each, at position kv_len - 1 (its slot just allocated), read from last_tokens on the
    device since the host may not have it yet."""
    ids: list[int] = []
    positions: list[int] = []
    ext_lens, logits_starts = [], []
    prefilling = len(reqs) - riders
    for req, start in zip(reqs[:prefilling], starts):
        ids.extend(req.fill_ids[start : req.kv_len])
        positions.extend(range(start, req.kv_len))
        ext_lens.append(req.kv_len - start)
        # A jump-forward draft is verified against the logits at every position it runs.
        logits_starts.append(0 if req.draft_len else prompt_logits_start(req, start))
    for req in reqs[prefilling:]:
        ids.append(0)
        positions.append(req.kv_len - 1)
        ext_lens.append(1)
        logits_starts.append(-1)
    slots = torch.cat([pool.read(r.req_pool_idx, s, r.kv_len) for r, s in zip(reqs, starts)])
    per_req = to_device(
        [[r.req_pool_idx for r in reqs], [r.kv_len for r in reqs]], torch.int64, device
    )
    input_ids = to_device(ids, torch.int64, device)
    if riders:
        input_ids[-riders:] = last_tokens[per_req[0][-riders:]]
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        batch_size=len(reqs),
        input_ids=input_ids,
        positions=to_device(positions, torch.int64, device),
        req_pool_indices=per_req[0],
        seq_lens=per_req[1],
        out_cache_loc=slots.to(device),
        seq_lens_cpu=[r.kv_len for r in reqs],
        extend_prefix_lens_cpu=list(starts),
        extend_seq_lens_cpu=ext_lens,
        logits_start_cpu=logits_starts,
    )


def prompt_logits_start(req: Req, start: int) -> int:
    """Index (within this step's new tokens) of the first position whose logits give a
    prompt-token logprob, or -1 when this step needs none.

    The logprob of prompt token p comes from the logits at position p - 1.
    """
    if not req.return_logprob or req.logprob_start_len < 0 or req.output_ids:
        return -1
    first_pos = max(req.logprob_start_len, 1) - 1
    last_pos = len(req.origin_input_ids) - 2  # logits here predict the last prompt token
    lo = max(first_pos, start)
    if lo > last_pos or lo >= req.kv_len:
        return -1
    return lo - start


def decode_batch(
    reqs: list[Req], slots: torch.Tensor, device: torch.device, last_tokens: torch.Tensor
) -> ForwardBatch:
    """One new token per request at position kv_len - 1 (its slot was just allocated).
    The token is the request's newest, read from last_tokens (by req_to_token row) on the
    device: the host may not have it yet."""
    seq_lens = [r.kv_len for r in reqs]
    per_req = to_device(
        [[r.req_pool_idx for r in reqs], seq_lens, [n - 1 for n in seq_lens]], torch.int64, device
    )
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        batch_size=len(reqs),
        input_ids=last_tokens[per_req[0]],
        positions=per_req[2],
        req_pool_indices=per_req[0],
        seq_lens=per_req[1],
        out_cache_loc=slots.to(device),
        seq_lens_cpu=seq_lens,
    )


def sampling_batch(
    reqs: list[Req], vocab_size: int, device: torch.device, eos_ids: set[int]
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


def _add_penalties(sb: SamplingBatch, reqs: list[Req], vocab: int, device) -> None:
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
    sb: SamplingBatch, reqs: list[Req], vocab_size: int, device, eos_ids: set[int]
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
