"""Accumulates one request's outputs into stream chunks and the final result dict."""

from __future__ import annotations

import asyncio
import time

from loom.runtime.messages import ReqOutput
from loom.runtime.tokenizer.inputs import Item


class RequestState:
    def __init__(self, item: Item, tokenizer):
        self.item = item
        self.tokenizer = tokenizer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_time: float | None = None
        self.text = ""
        self.output_ids: list[int] = []
        self.last: ReqOutput | None = None
        self.finished = False
        self.input_token_logprobs: list = []
        self.input_top_logprobs: list = []
        self.output_token_logprobs: list = []
        self.output_top_logprobs: list = []

    def absorb(self, out: ReqOutput) -> dict:
        """Add an output; returns the stream chunk for it (deltas of text and ids)."""
        if out.new_token_ids and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.text += out.text
        self.output_ids.extend(out.new_token_ids)
        self.last = out
        self.finished = out.finished_reason is not None
        if self.item.request.return_logprob:
            if out.input_token_logprobs is not None:
                self.input_token_logprobs = self._entries(out.input_token_logprobs)
                self.input_top_logprobs = [self._top(t) for t in out.input_top_logprobs or []]
            self.output_token_logprobs += self._entries(out.output_token_logprobs)
            self.output_top_logprobs += [self._top(t) for t in out.output_top_logprobs]
        return {"text": out.text, "output_ids": list(out.new_token_ids), "meta_info": self.meta()}

    def result(self) -> dict:
        return {"text": self.text, "output_ids": self.output_ids, "meta_info": self.meta()}

    def meta(self) -> dict:
        out = self.last
        now = time.perf_counter()
        meta = {
            "id": self.item.request.rid,
            "prompt_tokens": out.prompt_tokens if out else len(self.item.request.input_ids),
            "completion_tokens": out.completion_tokens if out else 0,
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": out.finished_reason if out else None,
            "e2e_latency": now - self.created,
        }
        if self.first_token_time is not None:
            meta["ttft"] = self.first_token_time - self.created
        if out is not None and out.queue_time is not None:
            meta["queue_time"] = out.queue_time
        if out is not None and out.schema_violation:
            meta["schema_violation"] = out.schema_violation
        if self.item.request.return_logprob:
            meta["input_token_logprobs"] = self.input_token_logprobs
            meta["output_token_logprobs"] = self.output_token_logprobs
            if self.item.request.top_logprobs_num:
                meta["input_top_logprobs"] = self.input_top_logprobs
                meta["output_top_logprobs"] = self.output_top_logprobs
        return meta

    def _entries(self, pairs) -> list:
        """(logprob, token_id) -> [logprob, token_id, text or None]."""
        with_text = self.item.return_text_in_logprobs
        return [[lp, tid, self.tokenizer.decode([tid]) if with_text else None] for lp, tid in pairs]

    def _top(self, pairs) -> list | None:
        return None if pairs is None else self._entries(pairs)
