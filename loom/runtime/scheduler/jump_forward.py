"""Verified jump-forward: grammar-forced tokens run as a draft, checked like speculative
decoding, so the output is token for token what decoding one step at a time gives.

After a constrained request samples a token, the text its grammar forces next (the
`"age": ` between two JSON fields) is tokenized (loom.constrain.jump_forward) and
appended to output_ids as a draft (req.draft_len); the matcher does not see it. The
next decode step runs as one
extend batch: plain requests extend by their last token, drafted ones by their last
token and the draft, with logits at every position. Then, per drafted request, row j
(the logits after output + draft[:j]) is sampled exactly as a decode step would sample
it: the same penalties, grammar mask, min_new_tokens bans, seed and step. The token is
kept either way; verification goes on to row j + 1 only while it equals draft[j]. The
first mismatch replaces the rest of the draft, and a fully confirmed draft ends with a
bonus token from its last row. KV computed for dropped draft tokens is freed.

Exactness does not depend on the draft: any draft gives the tokens sequential decoding
gives (up to floating-point differences between the extend and decode kernels, the same
as between batch sizes). A good draft only saves steps. This holds for penalties and
logprobs too, because each row is sampled by the scheduler's own sampling path on the
request's real state; no request is left out of jump-forward for using them. SGLang's jump-forward spliced the forced tokens in unverified and
was removed because it changed outputs; this is what makes loom's safe to leave on.
"""

from __future__ import annotations

from typing import Protocol

import torch

from loom.constrain.jump_forward import forced_tokens
from loom.runtime.forward import ForwardBatch, LogitsOutput
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.kv_ops import KVOps
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.sampling import StepSampler


def drop_draft(req: Req) -> None:
    """Forget req's unverified draft (the matcher never accepted it)."""
    if req.draft_len:
        del req.output_ids[-req.draft_len :]
        req.draft_len = 0


class StepHost(Protocol):
    """What a drafted decode step needs from the loop that runs it: the forward, and the
    processing of sampled tokens every other step gets too (nothing may be in flight)."""

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        """Run one batch through the model (counted as a forward step)."""

    def sample_and_advance(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """Sample one token per request from its row of `logits` and process it."""

    def advance(self, req: Req, token: int) -> None:
        """Append one sampled token to req, finishing it if it is done."""

    def settle(self, req: Req) -> None:
        """After req's new tokens: free it if finished, else stream them and draft."""

    def fail(self, req: Req, exc: Exception) -> None:
        """Abort req, whose processing raised `exc`, and free its KV."""


class JumpForward:
    def __init__(
        self,
        tokenizer,
        context_len: int,
        kv: KVOps,
        sampler: StepSampler,
        device: torch.device,
        host: StepHost,
    ):
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.kv = kv
        self.sampler = sampler
        self.device = device
        self.host = host
        self.drafted_tokens = 0  # draft tokens run through the model
        self.accepted_tokens = 0  # of those, confirmed: one decode step saved each

    def draft(self, req: Req) -> bool:
        """Append the grammar's forced continuation to req as a draft; True if there is one."""
        assert not req.pending, "drafts follow processed tokens only"
        forced = req.grammar.find_jump_forward_string()
        if not forced:
            return False
        # Draft token j is checked by the row that samples output token len + j + 1: rows
        # past max_new_tokens or the context length would never be reached.
        room = min(
            req.sampling.max_new_tokens - len(req.output_ids),
            self.context_len - req.seqlen,
        )
        tokens = forced_tokens(self.tokenizer, req.output_ids, forced)
        if len(tokens) > 1:
            # The forced text's last token tends to merge with the free text after it
            # (`"` then `:` is spelled `":`), which the grammar cannot know: most drafts
            # would lose it in verification, at the cost of a row of compute.
            tokens = tokens[:-1]
        tokens = tokens[: max(room - 1, 0)]
        if not tokens:
            return False
        req.output_ids.extend(tokens)
        req.draft_len = len(tokens)
        return True

    def run_decode_step(self, reqs: list[Req]) -> None:
        """The decode step of `reqs` when some hold drafts. Each already holds the KV slot
        of its last token (alloc_decode_slots); drafted ones get slots for the draft too,
        or lose the draft when the pool cannot give them."""
        starts = [r.kv_len - 1 for r in reqs]
        for req in reqs:
            if req.draft_len and not self.kv.extend(req, req.draft_len):
                drop_draft(req)
        batch = batching.extend_batch(reqs, starts, self.kv.pool, self.device)
        out = self.host.forward(batch)
        plain = [i for i, r in enumerate(reqs) if not r.draft_len]
        drafted = [i for i, r in enumerate(reqs) if r.draft_len]
        self.host.sample_and_advance([reqs[i] for i in plain], out.next_logits[plain])
        for i in drafted:
            try:
                self.verify(reqs[i], out.prompt_logits[i])
            except Exception as exc:  # noqa: BLE001 - one request's fault (faults.py)
                self.host.fail(reqs[i], exc)

    def _sample(self, req: Req, logits: torch.Tensor) -> int:
        """req's next token from one row of logits (its logprobs recorded); the caller
        advances req itself."""
        step = self.sampler.queue([req], logits)
        req.pending -= 1
        return step.read()[0]

    def verify(self, req: Req, logits: torch.Tensor) -> None:
        """Keep the draft's tokens while the model samples them. logits: (draft_len + 1,
        vocab), row j after output + draft[:j]. Leaves req as a decode step would: new
        tokens appended and checked, KV held for all but the last."""
        draft = req.output_ids[-req.draft_len :]
        drop_draft(req)
        accepted = 0
        for j in range(len(draft) + 1):
            token = self._sample(req, logits[j : j + 1])
            self.host.advance(req, token)
            if j == len(draft) or token != draft[j]:
                break  # a bonus token after a confirmed draft, or the model's own choice
            accepted += 1
            if req.finished:
                break
        self.drafted_tokens += len(draft)
        self.accepted_tokens += accepted
        self.kv.truncate(req, req.seqlen - 1)
        self.host.settle(req)
