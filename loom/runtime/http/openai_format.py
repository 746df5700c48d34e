"""loom results -> OpenAI response objects: choices, logprobs, usage, and the chunks of a
stream. Pure translation: nothing here talks to the runtime."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loom.constrain.tools.parser import ToolCallStream
from loom.runtime.http.openai_tools import ChatTools, stream_delta


@dataclass
class Reply:
    """What every object of one response shares."""

    id: str
    model: str
    n: int  # completions per prompt
    logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))
    continuous_usage: bool = False  # stream_options.continuous_usage_stats

    def envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def finish_reason(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason["type"]  # stop | length | abort (by the client)


def usage(metas: list[dict], n: int) -> dict:
    """Token counts; a prompt shared by n completions is counted once, as OpenAI does."""
    return _usage(metas[::n], metas)


def _usage(firsts: list[dict], metas: list[dict]) -> dict:
    """Token counts of completions `metas` whose prompts are those of `firsts`."""
    prompt = sum(m["prompt_tokens"] for m in firsts)
    completion = sum(m["completion_tokens"] for m in metas)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(m["cached_tokens"] for m in firsts)},
    }


# ---- logprobs ---------------------------------------------------------------------------
# loom's entries are [logprob, token_id, token_text]; top lists hold such entries.


def completion_logprobs(tokens: list, tops: list, text_offset: int) -> dict:
    offsets = []
    for entry in tokens:
        offsets.append(text_offset)
        text_offset += len(entry[2])
    return {
        "tokens": [e[2] for e in tokens],
        "token_logprobs": [e[0] for e in tokens],
        "top_logprobs": [{e[2]: e[0] for e in top or []} for top in tops] if tops else None,
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list, tops: list) -> dict:
    def one(entry: list) -> dict:
        return {"token": entry[2], "logprob": entry[0], "bytes": list(entry[2].encode())}

    content = []
    for i, entry in enumerate(tokens):
        top = tops[i] if i < len(tops) else None
        content.append({**one(entry), "top_logprobs": [one(e) for e in top or []]})
    return {"content": content, "refusal": None}


def _logprob_lists(meta: dict, start: int = 0) -> tuple[list, list]:
    return (
        meta.get("output_token_logprobs", [])[start:],
        meta.get("output_top_logprobs", [])[start:],
    )


# ---- whole responses --------------------------------------------------------------------


def completion_response(results: list[dict], reply: Reply) -> dict:
    choices = []
    for i, r in enumerate(results):
        lp = completion_logprobs(*_logprob_lists(r["meta_info"]), 0) if reply.logprobs else None
        choices.append(
            {
                "index": i,
                "text": r["text"],
                "logprobs": lp,
                "finish_reason": finish_reason(r["meta_info"]),
            }
        )
    metas = [r["meta_info"] for r in results]
    return {**reply.envelope("text_completion"), "choices": choices, "usage": usage(metas, reply.n)}


def chat_response(results: list[dict], reply: Reply, tools: ChatTools | None = None) -> dict:
    choices = []
    for i, r in enumerate(results):
        lp = chat_logprobs(*_logprob_lists(r["meta_info"])) if reply.logprobs else None
        message = {"role": "assistant", "content": r["text"]}
        reason = finish_reason(r["meta_info"])
        if tools is not None:
            message, reason = tools.message(r["text"], reason)
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
    metas = [r["meta_info"] for r in results]
    return {**reply.envelope("chat.completion"), "choices": choices, "usage": usage(metas, reply.n)}


# ---- streams ----------------------------------------------------------------------------


class _StreamTally:
    """Per choice: logprob entries already sent, text length so far, the last meta."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.text_len: dict[int, int] = {}
        self.metas: dict[int, dict] = {}

    def new_logprobs(self, index: int, meta: dict) -> tuple[list, list]:
        tokens, tops = _logprob_lists(meta, self.sent.get(index, 0))
        self.sent[index] = self.sent.get(index, 0) + len(tokens)
        return tokens, tops

    def usage(self, n: int) -> dict:
        return usage([self.metas[i] for i in sorted(self.metas)], n)

    def with_usage(self, chunk: dict, reply: Reply) -> dict:
        """The chunk, with the usage so far when the stream asked for it in every chunk
        (choices not yet heard from count no tokens)."""
        if reply.continuous_usage:
            firsts: dict[int, dict] = {}
            for index in sorted(self.metas):  # choice index // n: the prompt's
                firsts.setdefault(index // reply.n, self.metas[index])
            chunk["usage"] = _usage(list(firsts.values()), list(self.metas.values()))
        return chunk


async def completion_stream(
    chunks: AsyncIterator[dict], reply: Reply, include_usage: bool
) -> AsyncIterator[dict]:
    tally = _StreamTally()
    async for chunk in chunks:
        index, meta = chunk.get("index", 0), chunk["meta_info"]
        tally.metas[index] = meta
        logprobs = None
        if reply.logprobs:
            offset = tally.text_len.get(index, 0)
            logprobs = completion_logprobs(*tally.new_logprobs(index, meta), offset)
        tally.text_len[index] = tally.text_len.get(index, 0) + len(chunk["text"])
        if not chunk["text"] and finish_reason(meta) is None and not (logprobs or {}).get("tokens"):
            continue
        choice = {
            "index": index,
            "text": chunk["text"],
            "logprobs": logprobs,
            "finish_reason": finish_reason(meta),
        }
        yield tally.with_usage({**reply.envelope("text_completion"), "choices": [choice]}, reply)
    if include_usage:
        yield {**reply.envelope("text_completion"), "choices": [], "usage": tally.usage(reply.n)}


async def chat_stream(
    chunks: AsyncIterator[dict],
    reply: Reply,
    choices: int,
    include_usage: bool,
    tools: ChatTools | None = None,
) -> AsyncIterator[dict]:
    """Chunks in OpenAI's shape; with tools, each choice's text goes through a
    ToolCallStream, which sends calls as tool_calls deltas."""
    kind = "chat.completion.chunk"
    for index in range(choices):
        role = {"index": index, "delta": {"role": "assistant", "content": ""}}
        yield {
            **reply.envelope(kind),
            "choices": [{**role, "logprobs": None, "finish_reason": None}],
        }
    tally = _StreamTally()
    streams: dict[int, ToolCallStream] = {}
    async for chunk in chunks:
        index, meta = chunk.get("index", 0), chunk["meta_info"]
        tally.metas[index] = meta
        logprobs = chat_logprobs(*tally.new_logprobs(index, meta)) if reply.logprobs else None
        reason = finish_reason(meta)
        delta = {"content": chunk["text"]} if chunk["text"] else {}
        if tools is not None:
            stream = streams.setdefault(index, tools.stream())
            delta, reason = stream_delta(stream, chunk["text"], reason)
        if not delta and reason is None and not (logprobs or {}).get("content"):
            continue
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        yield tally.with_usage({**reply.envelope(kind), "choices": [choice]}, reply)
    if include_usage:
        yield {**reply.envelope(kind), "choices": [], "usage": tally.usage(reply.n)}
