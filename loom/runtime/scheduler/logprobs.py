"""Logprob bookkeeping: the prompt and output logprobs a request asked for, gathered from
a step's logits into the request's lists (the scheduler sends them with its outputs)."""

from __future__ import annotations

import torch

from loom.runtime.executor.host_copy import HostCopy
from loom.runtime.executor.sampler import token_logprobs
from loom.runtime.forward import LogitsOutput
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req


class OutputLogprobs:
    """Logprobs of a step's sampled tokens, computed on the device when the step is
    queued and read on the host when its tokens are (overlap scheduling reads them one
    step later)."""

    def __init__(self, reqs: list[Req], rows: list[int], raw: torch.Tensor, tokens: torch.Tensor):
        self.rows = rows
        self.top_nums = [reqs[i].top_logprobs_num for i in rows]
        chosen, top_v, top_i = token_logprobs(raw, tokens, max(self.top_nums))
        self._copy = HostCopy(chosen, tokens, top_v, top_i)

    def record(self, reqs: list[Req]) -> None:
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


def gather_prompt_logprobs(reqs: list[Req], starts: list[int], out: LogitsOutput) -> None:
    """Prompt-token logprobs from an extend step's per-request logits (batch.extend_batch
    asked for them from prompt_logits_start on)."""
    for req, start, logits in zip(reqs, starts, out.prompt_logits):
        if logits is None:
            continue
        if req.logprob_start_len == 0 and start == 0:  # the first token has no logprob
            req.input_token_logprobs.append((None, req.origin_input_ids[0]))
            if req.top_logprobs_num:
                req.input_top_logprobs.append(None)
        first_pos = start + batching.prompt_logits_start(req, start)
        n = min(logits.shape[0], len(req.origin_input_ids) - 1 - first_pos)
        targets = torch.tensor(
            req.origin_input_ids[first_pos + 1 : first_pos + 1 + n], device=logits.device
        )
        chosen, top_v, top_i = token_logprobs(logits[:n], targets, req.top_logprobs_num)
        req.input_token_logprobs.extend(zip(chosen.tolist(), targets.tolist()))
        if top_v is not None:
            for vals, ids in zip(top_v.tolist(), top_i.tolist()):
                req.input_top_logprobs.append(list(zip(vals, ids)))
