"""Token ids -> text, incrementally, with stop strings trimmed; and its process loop.

Decoding a whole output again at every step costs O(n^2); instead each request keeps two
offsets into its ids (the vLLM / HF TextStreamer scheme): text is decoded from a few
tokens before the unread ones, so tokenizers that merge or prefix spaces across token
boundaries still yield the right characters, and a piece ending in an incomplete UTF-8
character is held back until the rest arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from loom.runtime import messages as m
from loom.runtime.watchdog import Heartbeat

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all text decoded so far
    emitted: int = 0  # characters of text already sent


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def process(self, out: m.ReqOutput) -> m.ReqOutput:
        """Fill out.text with the text delta since the request's last output."""
        state = self.states.setdefault(out.rid, DecodeState())
        state.ids.extend(out.new_token_ids)
        state.text += self._new_text(state, out)
        if out.finished_reason is not None:
            self.states.pop(out.rid, None)
            final = self._final_text(state, out)
            out.text = final[state.emitted :]
        else:
            safe = len(state.text) - _stop_prefix_holdback(state.text, out.stop)
            out.text = state.text[state.emitted : safe] if safe > state.emitted else ""
            state.emitted = max(state.emitted, safe)
        return out

    def _decode(self, ids: list[int], out: m.ReqOutput) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=out.skip_special_tokens,
            spaces_between_special_tokens=out.spaces_between_special_tokens,
        )

    def _new_text(self, state: DecodeState, out: m.ReqOutput) -> str:
        prefix = self._decode(state.ids[state.prefix_offset : state.read_offset], out)
        full = self._decode(state.ids[state.prefix_offset :], out)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character is still incomplete
        state.prefix_offset, state.read_offset = state.read_offset, len(state.ids)
        return full[len(prefix) :]

    def _final_text(self, state: DecodeState, out: m.ReqOutput) -> str:
        # Flush a trailing incomplete character as the tokenizer renders it, decoded after
        # the same prefix window as the stream (so a SentencePiece "▁" keeps its space).
        text = state.text
        if state.read_offset < len(state.ids):
            prefix = self._decode(state.ids[state.prefix_offset : state.read_offset], out)
            full = self._decode(state.ids[state.prefix_offset :], out)
            text += full[len(prefix) :]
        matched = out.finished_reason.get("matched")
        if out.no_stop_trim or out.finished_reason.get("type") != "stop":
            return text
        if isinstance(matched, str):
            cut = text.find(matched)
            return text[:cut] if cut >= 0 else text
        if isinstance(matched, int) and state.ids and state.ids[-1] == matched:
            # A stop token's own text (an ordinary token given in stop_token_ids) is not
            # part of the answer; special tokens like EOS render as "" anyway.
            return self.tokenizer.decode(
                state.ids[:-1],
                skip_special_tokens=out.skip_special_tokens,
                spaces_between_special_tokens=out.spaces_between_special_tokens,
            )
        return text


def _stop_prefix_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (kept back from
    a stream until the next tokens show whether the stop string completes)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def run_detokenizer_process(
    tokenizer_path: str,
    in_addr: str,
    out_addr: str,
    log_level: str,
    log_format: str,
    heartbeat: Heartbeat,
    ready_conn,
) -> None:
    """Detokenizer process: scheduler outputs in, text deltas out; other messages pass.
    Every turn of its loop beats `heartbeat`, waking to beat while no message comes (so
    the parent's watchdog tells an idle detokenizer from a stopped one)."""
    import zmq
    from transformers import AutoTokenizer

    from loom.runtime.process_util import configure_process

    configure_process("detokenizer", log_level, log_format)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    detok = IncrementalDetokenizer(tokenizer)
    ctx = zmq.Context(1)
    receiver = ctx.socket(zmq.PULL)
    receiver.bind(in_addr)
    sender = ctx.socket(zmq.PUSH)
    sender.connect(out_addr)
    ready_conn.send(m.DetokenizerReady())
    while True:
        heartbeat.beat()
        if not receiver.poll(heartbeat.idle_ms):
            continue
        msg = receiver.recv_pyobj()
        if isinstance(msg, m.ShutdownRequest):
            break
        if isinstance(msg, m.BatchOutput):
            msg = m.BatchOutput([detok.process(o) for o in msg.outputs])
        sender.send_pyobj(msg)
