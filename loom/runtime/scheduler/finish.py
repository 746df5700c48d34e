"""Decides whether a request is finished after it receives a new token, and what its
finish says."""

from __future__ import annotations

import json

from loom.constrain.schema_check import validate_output
from loom.runtime.scheduler.request import FinishReason, Req

_CUT_OFF = (
    "max_new_tokens ran out before the grammar completed: "
    "the constrained output is cut off (raise max_new_tokens)"
)


class FinishChecker:
    def __init__(self, tokenizer, eos_ids: set[int], context_len: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_len = context_len

    def check(self, req: Req) -> FinishReason | None:
        p = req.sampling
        token = req.output_ids[-1]
        if len(req.output_ids) >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
                return FinishReason("stop", token)
            if req.grammar is not None and req.grammar.is_terminated():
                return FinishReason("stop", token)
            matched = self._stop_string(req)
            if matched is not None:
                return FinishReason("stop", matched)
        if len(req.output_ids) >= p.max_new_tokens:
            return FinishReason("length", None)
        if req.seqlen >= self.context_len:
            return FinishReason("length", None, "reached the context length")
        return None

    def conclude(self, req: Req, reason: FinishReason) -> None:
        """Finish req: a constrained output cut off by its length says so, and a lenient
        schema's output is checked against the schema (the violation is reported)."""
        if req.grammar is not None and reason.type == "length" and not req.grammar.is_terminated():
            reason = FinishReason("length", None, _CUT_OFF)
        req.finished_reason = reason
        p = req.sampling
        if p.json_schema is not None and p.json_schema_lenient and reason.type != "abort":
            text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
            req.schema_violation = validate_output(json.loads(p.json_schema), text)

    def out_of_room(self, req: Req) -> bool:
        """Whether the request's tokens, counting those not yet processed, already reach
        its length limit: a further step for it would be discarded."""
        n = len(req.output_ids) + req.pending
        return n >= req.sampling.max_new_tokens or req.seqlen + req.pending >= self.context_len

    def _stop_string(self, req: Req) -> str | None:
        stops = req.sampling.stop
        if not stops or self.tokenizer is None:
            return None
        # Every token covers at least one byte, so a stop string of B bytes lies within the
        # last B tokens (plus a partial character at either end): decode only that tail.
        window = max(len(s.encode()) for s in stops) + 2
        tail = self.tokenizer.decode(
            req.output_ids[-window:], skip_special_tokens=req.sampling.skip_special_tokens
        )
        hits = [(tail.find(s), s) for s in stops if s in tail]
        return min(hits)[1] if hits else None
