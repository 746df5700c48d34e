"""What the scheduler sends about a request: its tokens and logprobs since the last
message, with what the detokenizer needs to turn them into text."""

from __future__ import annotations

from loom.runtime import messages as m
from loom.runtime.scheduler.request import Req


def take_output(req: Req) -> m.ReqOutput:
    """The request's news since its last output; marks it sent."""
    out = m.ReqOutput(
        rid=req.rid,
        new_token_ids=req.output_ids[req.sent_len :],
        finished_reason=req.finished_reason.to_json() if req.finished_reason else None,
        prompt_tokens=len(req.origin_input_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens,
        stop=req.sampling.stop,
        skip_special_tokens=req.sampling.skip_special_tokens,
        spaces_between_special_tokens=req.sampling.spaces_between_special_tokens,
        no_stop_trim=req.sampling.no_stop_trim,
        schema_violation=req.schema_violation,
        queue_time=req.queue_time,
    )
    if req.return_logprob:
        out.output_token_logprobs = req.output_token_logprobs[req.sent_logprob_len :]
        out.output_top_logprobs = req.output_top_logprobs[req.sent_logprob_len :]
        req.sent_logprob_len = len(req.output_token_logprobs)
        if not req.sent_input_logprobs:
            out.input_token_logprobs = req.input_token_logprobs
            out.input_top_logprobs = req.input_top_logprobs
            req.sent_input_logprobs = True
    req.sent_len = len(req.output_ids)
    return out
