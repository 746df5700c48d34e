"""A request as the scheduler tracks it through waiting, prefill, decode and finish."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import SamplingParams

_arrival = itertools.count()


@dataclass(frozen=True)
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None  # the stop token id or stop string
    message: str | None = None  # for aborts: why

    def to_json(self) -> dict:
        out: dict[str, Any] = {"type": self.type, "matched": self.matched}
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass(eq=False)
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    seed: int = 0  # the sampling seed actually used (from params or drawn)

    output_ids: list[int] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrival))
    queued_at: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # seconds from arrival to first admission
    finished_reason: FinishReason | None = None

    # KV bookkeeping. prefix_indices: slots of the cached prefix this request matched
    # (locked through last_node). kv_len: tokens whose KV this request holds, counted
    # from position 0 (prefix included); they sit in req_to_token[req_pool_idx, :kv_len].
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None
    kv_len: int = 0
    cached_tokens: int = 0  # prompt tokens served from the cache (reported in meta_info)
    retractions: int = 0

    # Waiting-queue bookkeeping for SchedulePolicy's starvation bounds: scheduling rounds
    # this request has waited, and times it was deferred behind a request sharing its prefix.
    wait_rounds: int = 0
    deferrals: int = 0

    # Grammar matcher (constrained requests), set once its grammar compiled. It has
    # accepted exactly the verified output tokens (never a draft's).
    grammar: Any = None
    # Jump-forward: the last draft_len output_ids are grammar-forced tokens not yet checked
    # against the model's own choices; the next decode step verifies them (jump_forward.py).
    draft_len: int = 0
    schema_violation: str | None = None  # lenient JSON schema: what the output broke
    # Overlap scheduling: tokens sampled by queued steps that the host has not read yet
    # (at most 2: the step in flight and the one being queued behind it).
    pending: int = 0

    # Streaming bookkeeping: how much has been sent to the detokenizer.
    sent_len: int = 0
    sent_logprob_len: int = 0
    sent_input_logprobs: bool = False

    # Logprobs gathered so far: lists of (logprob, token_id) and top-k lists.
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)

    @classmethod
    def from_message(cls, msg: GenerateRequest, seed: int) -> Req:
        """The scheduler's request for a tokenizer manager's message. Any 64-bit seed (the
        openai client sends up to 2**64 - 1) is folded into the int64 the kernels take."""
        return cls(
            rid=msg.rid,
            origin_input_ids=list(msg.input_ids),
            sampling=msg.sampling,
            return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num,
            stream=msg.stream,
            seed=seed % (1 << 63),
        )

    def accept_grammar(self, token: int) -> bool:
        """Whether the request's grammar, if it has one, takes the token (and moves on)."""
        return self.grammar is None or self.grammar.accept_token(token)

    @property
    def fill_ids(self) -> list[int]:
        """Every token of the request so far: prompt then output."""
        return self.origin_input_ids + self.output_ids

    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def prefill_done(self) -> bool:
        return self.kv_len >= self.seqlen - 1 and self.kv_len > 0
