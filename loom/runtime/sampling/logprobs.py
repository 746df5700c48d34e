"""Logprob bookkeeping: the prompt and output logprobs a request asked for, gathered from
a step's logits into the request's lists (the scheduler sends them with its outputs).

They are those of the raw model distribution (before penalties, masks and temperature),
as vLLM and the OpenAI API report them."""

from __future__ import annotations

from typing import Protocol

import torch

from loom.runtime.executor.host_copy import HostCopy
from loom.runtime.forward import LogitsOutput


class LogprobRequest(Protocol):
    """What logprob gathering reads of a scheduled request (the scheduler's Req), and the
    lists it appends to."""

    @property
    def return_logprob(self) -> bool: ...
    @property
    def logprob_start_len(self) -> int: ...
    @property
    def top_logprobs_num(self) -> int: ...
    @property
    def origin_input_ids(self) -> list[int]: ...
    @property
    def output_ids(self) -> list[int]: ...
    @property
    def kv_len(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def input_token_logprobs(self) -> list: ...
    @property
    def input_top_logprobs(self) -> list: ...
    @property
    def output_token_logprobs(self) -> list: ...
    @property
    def output_top_logprobs(self) -> list: ...


class OutputLogprobs:
    """Logprobs of a step's sampled tokens, computed on the device when the step is
    queued and read on the host when its tokens are (overlap scheduling reads them one
    step later)."""

    def __init__(
        self, reqs: list[LogprobRequest], rows: list[int], raw: torch.Tensor, tokens: torch.Tensor
    ):
        self.rows = rows
        self.top_nums = [reqs[i].top_logprobs_num for i in rows]
        chosen, top_v, top_i = token_logprobs(raw, tokens, max(self.top_nums))
        self._copy = HostCopy(chosen, tokens, top_v, top_i)

    def record(self, reqs: list[LogprobRequest]) -> None:
        """Append each row's logprobs to its request (reqs as given to __init__); finished
        requests (their step ran before the host learned they were done) are skipped."""
        chosen, tokens, top_v, top_i = self._copy.get()
        chosen_l, tokens_l = chosen.tolist(), tokens.tolist()
        top_vl = top_v.tolist() if top_v is not None else None
        top_il = top_i.tolist() if top_i is not None else None
        for j, (i, n) in enumerate(zip(self.rows, self.top_nums)):
            req = reqs[i]
            if req.finished:
                continue
            req.output_token_logprobs.append((chosen_l[j], tokens_l[j]))
            if n > 0:
                req.output_top_logprobs.append(list(zip(top_vl[j][:n], top_il[j][:n])))


def gather_prompt_logprobs(
    reqs: list[LogprobRequest], starts: list[int], out: LogitsOutput
) -> None:
    """Prompt-token logprobs from an extend step's per-request logits (scheduler/batch.py's
    extend_batch asked for them from prompt_logits_start on)."""
    for req, start, logits in zip(reqs, starts, out.prompt_logits):
        if logits is None:
            continue
        if req.logprob_start_len == 0 and start == 0:  # the first token has no logprob
            req.input_token_logprobs.append((None, req.origin_input_ids[0]))
            if req.top_logprobs_num:
                req.input_top_logprobs.append(None)
        first_pos = start + prompt_logits_start(req, start)
        n = min(logits.shape[0], len(req.origin_input_ids) - 1 - first_pos)
        targets = torch.tensor(
            req.origin_input_ids[first_pos + 1 : first_pos + 1 + n], device=logits.device
        )
        chosen, top_v, top_i = token_logprobs(logits[:n], targets, req.top_logprobs_num)
        req.input_token_logprobs.extend(zip(chosen.tolist(), targets.tolist()))
        if top_v is not None:
            for vals, ids in zip(top_v.tolist(), top_i.tolist()):
                req.input_top_logprobs.append(list(zip(vals, ids)))


def prompt_logits_start(req: LogprobRequest, start: int) -> int:
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


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p(token) per row, and the top_k (values, ids) per row when top_k > 0."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(-1)
    if top_k <= 0:
        return chosen, None, None
    values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    return chosen, values, ids
