"""Builds the model's inputs (ForwardBatch) from scheduled requests.

Each builder assumes the requests' KV slots for the new tokens are already allocated
and written into req_to_token; it only gathers tensors.
"""

from __future__ import annotations

import torch

from loom.runtime.executor.host_copy import to_device
from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.memory.req_to_token import ReqToTokenPool
from loom.runtime.sampling.logprobs import prompt_logits_start
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


def decode_batch(
    reqs: list[Req], slots: torch.Tensor, device: torch.device, last_tokens: torch.Tensor | None
) -> ForwardBatch:
    """One new token per request at position kv_len - 1 (its slot was just allocated).
    The token is the request's newest, read from last_tokens (by req_to_token row) on the
    device: the host may not have it yet. last_tokens None: the caller reads them later
    (take_last_tokens), once the step sampling them is queued."""
    seq_lens = [r.kv_len for r in reqs]
    per_req = to_device(
        [[r.req_pool_idx for r in reqs], seq_lens, [n - 1 for n in seq_lens]], torch.int64, device
    )
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        batch_size=len(reqs),
        input_ids=None if last_tokens is None else last_tokens[per_req[0]],
        positions=per_req[2],
        req_pool_indices=per_req[0],
        seq_lens=per_req[1],
        out_cache_loc=slots.to(device),
        seq_lens_cpu=seq_lens,
    )


def take_last_tokens(batch: ForwardBatch, last_tokens: torch.Tensor) -> ForwardBatch:
    """A decode batch built without its input tokens, given them (queued on the device)."""
    batch.input_ids = last_tokens[batch.req_pool_indices]
    return batch
