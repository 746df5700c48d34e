"""What one forward step reads and returns: the batch the model and attention backends
read, and the logits the runner hands back.

A neutral home below the executor, the models and the layers: each of them imports these
types downward, none reaches up into another for them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens (a prompt or its chunk) on top of a cached prefix
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # (num_tokens,) the new tokens of every request, concatenated
    positions: torch.Tensor  # (num_tokens,)
    req_pool_indices: torch.Tensor  # (bs,) int64 rows of req_to_token
    seq_lens: torch.Tensor  # (bs,) int64 total tokens per request after this step
    out_cache_loc: torch.Tensor  # (num_tokens,) int64 KV slots the new tokens are written to
    # Host copies, for backends that plan on the CPU and for logits selection.
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)  # EXTEND only
    extend_seq_lens_cpu: list[int] = field(default_factory=list)  # EXTEND only: new tokens
    # Per request: first new-token index whose logits are needed (-1: only the last).
    logits_start_cpu: list[int] = field(default_factory=list)
    # EXTEND: the only tokens whose final hidden states are returned (None: all of them).
    output_rows: torch.Tensor | None = None
    # Filled by the attention backend's plan step.
    attn_metadata: object = None
    # DECODE replayed from a CUDA graph: batch_size is the padded, captured size.
    in_cuda_graph: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class LogitsOutput:
    next_logits: torch.Tensor  # (bs, vocab) model dtype: logits after each request's last token
    # EXTEND only, per request: float32 logits of new tokens from logits_start on (n_i, vocab),
    # or None
    prompt_logits: list[torch.Tensor | None]
