"""The small messages the processes send each other over zmq (pickled dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.runtime.sampling.params import SamplingParams

# ---- tokenizer manager -> scheduler ------------------------------------------------------


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class AbortRequest:
    rid: str


@dataclass
class FlushCacheRequest:
    pass


@dataclass
class ServerInfoRequest:
    pass


@dataclass
class ShutdownRequest:
    pass


# ---- scheduler -> detokenizer -> tokenizer manager ---------------------------------------


@dataclass
class ReqOutput:
    """New tokens of one request since its last output (all of them for a non-stream request)."""

    rid: str
    new_token_ids: list[int]
    finished_reason: dict | None  # FinishReason.to_json() once finished
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Logprob pieces since the last output: lists of (logprob, token_id) and, per position,
    # lists of top (logprob, token_id). Input ones arrive once, with the first output.
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_token_logprobs: list | None = None
    input_top_logprobs: list | None = None
    # What the detokenizer needs to turn ids into text (stop strings to trim, ...).
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # Filled by the detokenizer: the text delta since the last output.
    text: str = ""
    # Set when a lenient JSON schema's output failed validation.
    schema_violation: str | None = None
    # Seconds the request waited before its first prefill (None until it was admitted).
    queue_time: float | None = None


@dataclass
class BatchOutput:
    outputs: list[ReqOutput]


@dataclass
class ServerInfo:
    max_total_tokens: int
    available_tokens: int
    cache_tokens: int  # tokens held by the prefix cache (evictable + protected)
    evictable_tokens: int
    running_requests: int
    waiting_requests: int
    context_length: int
    max_running_requests: int
    vocab_size: int
    cache_hit_tokens: int  # prompt tokens served from the cache, cumulative
    prompt_tokens_total: int
    generation_tokens_total: int
    retractions_total: int
    evicted_tokens_total: int
    forward_steps_total: int = 0  # model forwards run (extend and decode steps)
    # Jump-forward: grammar-forced draft tokens run, and those the model confirmed (each
    # one a decode step saved).
    jump_forward_draft_tokens_total: int = 0
    jump_forward_tokens_total: int = 0

    @property
    def tokens_in_use(self) -> int:
        """KV slots held by requests: neither free nor reclaimable from the prefix cache."""
        return self.max_total_tokens - self.available_tokens - self.evictable_tokens


@dataclass
class FlushCacheResult:
    ok: bool
    message: str = ""


@dataclass
class SchedulerReady:
    info: ServerInfo


@dataclass
class DetokenizerReady:
    pass


@dataclass
class SchedulerCrashed:
    message: str
