"""Model output -> content and tool calls, whole or while it streams.

`scan` reads the text so far: content is the text outside the calls (whitespace next to a
call dropped); a call is `{"name": <a tool's name>, "arguments"|"parameters": {...}}` in
the format's envelope. A call that does not parse (broken JSON, a name not among the
tools, a missing envelope end) is not a call: its text stays in the content and the
reason is kept in `errors`, never an exception. Before the end (`final=False`) the text
that may still become a call is held back, and a call whose name is known is reported
with the arguments so far, so a stream can send them in pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from loom.constrain.tools.formats import Envelope, ToolFormat

_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
# A text that may still grow into _HEAD (each part optional once the previous is complete).
_PARTIAL_HEAD = re.compile(
    r'\{\s*(?:"(?:n(?:a(?:m(?:e(?:"\s*(?::\s*(?:"[^"\\]*(?:"\s*(?:,\s*(?:"[a-z]*(?:"\s*)?)?)?)?)?)?)?)?)?)?)?)?\Z'
)
_CLOSE_CALL = re.compile(r"\s*\}")
_LIST_SEPARATOR = re.compile(r"\s*,\s*")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class PartialCall:
    name: str
    arguments: str  # the arguments' JSON text (so far, while not complete)
    complete: bool


@dataclass(frozen=True)
class Scan:
    content: str
    calls: tuple[PartialCall, ...]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: new_call_id())

    def openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # None when the output held only calls
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]  # why text that looked like a call is not one


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, fmt: ToolFormat, names: frozenset[str]) -> ParsedOutput:
    """The whole output of a generation."""
    scan = scan_output(text, fmt, names, final=True)
    calls = tuple(ToolCall(c.name, c.arguments) for c in scan.calls)
    content = scan.content if scan.content.strip() or not calls else None
    return ParsedOutput(content, calls, scan.errors)


def scan_output(text: str, fmt: ToolFormat, names: frozenset[str], final: bool) -> Scan:
    content: list[str] = []
    calls: list[PartialCall] = []
    errors: list[str] = []
    pos, after_call = 0, False
    while True:
        start, envelope = _next_envelope(text, pos, fmt)
        piece = text[pos : len(text) if envelope is None else start]
        piece = piece.lstrip() if after_call else piece
        if envelope is None:
            content.append(piece if final else _held_back(piece, fmt))
            break
        region = _region(text, start, envelope, names, final)
        if region.error is not None:  # not a call: the envelope's text is content
            errors.append(region.error)
            end = _envelope_end(text, start, envelope)
            content.append(piece + text[start:end])
            pos, after_call = end, False
            continue
        content.append(_before_call(piece, fmt))
        calls.extend(region.calls)
        if region.end is None:  # still growing: nothing after it is known yet
            break
        pos, after_call = region.end, True
    return Scan("".join(content), tuple(calls), tuple(errors))


def _envelope_end(text: str, start: int, envelope: Envelope) -> int:
    """Where an envelope that holds no call ends: after its close marker (the end of the
    text while there is none); a bare call's after its trigger, where scanning goes on."""
    close = envelope.close.strip()
    if not close:
        return start + len(envelope.trigger)
    found = text.find(close, start + len(envelope.trigger))
    return found + len(close) if found >= 0 else len(text)


def _next_envelope(text: str, pos: int, fmt: ToolFormat) -> tuple[int, Envelope | None]:
    found = [(text.find(e.trigger, pos), i) for i, e in enumerate(fmt.envelopes)]
    found = [(at, i) for at, i in found if at >= 0]
    if not found:
        return -1, None
    at, i = min(found)
    return at, fmt.envelopes[i]


def _held_back(piece: str, fmt: ToolFormat) -> str:
    """Content safe to show before the end: not a trailing start of a trigger or of the
    lead marker (a call may follow), nor trailing whitespace (dropped if one does)."""
    starts = [(e.trigger, len(e.trigger) - 1) for e in fmt.envelopes]
    starts += [(fmt.lead, len(fmt.lead))] if fmt.lead else []
    while True:
        cut = max((_started(piece, m, longest) for m, longest in starts), default=0)
        shown = piece[: len(piece) - cut].rstrip()
        if shown == piece:
            return shown
        piece = shown


def _started(piece: str, marker: str, longest: int) -> int:
    """The length of the longest end of `piece` that starts `marker` (at most `longest`)."""
    for cut in range(min(longest, len(piece)), 0, -1):
        if marker.startswith(piece[-cut:]):
            return cut
    return 0


def _before_call(piece: str, fmt: ToolFormat) -> str:
    piece = piece.rstrip()
    if fmt.lead and piece.endswith(fmt.lead):
        piece = piece[: -len(fmt.lead)].rstrip()
    return piece


@dataclass(frozen=True)
class _Region:
    calls: tuple[PartialCall, ...] = ()
    end: int | None = None  # None: not finished (only before the end of the output)
    error: str | None = None


def _region(
    text: str, start: int, envelope: Envelope, names: frozenset[str], final: bool
) -> _Region:
    """The calls of one envelope starting at `start` (where its trigger is)."""
    opened = re.compile(envelope.open_re).match(text, start)
    if opened is None or (envelope.open and opened.end() == len(text)):
        if not final and envelope.open.startswith(text[start:].rstrip()[: len(envelope.open)]):
            return _Region()
        return _Region(error=f"{envelope.trigger} is not followed by {envelope.open!r}")
    calls: list[PartialCall] = []
    pos = opened.end()
    while True:
        call, end, error = _call(text, pos, names, final)
        if error is not None:
            return _Region(error=error)
        if call is not None:
            calls.append(call)
        if end is None:
            return _Region(tuple(calls))
        pos = end
        if envelope.is_list and (sep := _LIST_SEPARATOR.match(text, pos)) is not None:
            pos = sep.end()
            continue
        closed = re.compile(envelope.close_re).match(text, pos)
        rest = text[pos:].strip()
        if closed is not None and (closed.end() > pos or not envelope.close):
            return _Region(tuple(calls), closed.end())
        if not final and envelope.close.strip().startswith(rest):
            return _Region(tuple(calls))
        if final and not rest:  # the output ended right after the call: take it
            return _Region(tuple(calls), len(text))
        return _Region(error=f"a tool call is not closed by {envelope.close.strip()!r}")


def _call(
    text: str, pos: int, names: frozenset[str], final: bool
) -> tuple[PartialCall | None, int | None, str | None]:
    """(call so far, end, error) of the call object at pos."""
    head = _HEAD.match(text, pos)
    if head is None:
        if not final and _PARTIAL_HEAD.match(text[pos:].rstrip() or "{"):
            return None, None, None
        return _whole_object(text, pos, names)
    name = head.group(1)
    if name not in names:
        return (
            None,
            None,
            f"the model called {name!r}, which is not among the tools {sorted(names)}",
        )
    args_at = head.end()
    try:
        arguments, end = _DECODER.raw_decode(text, args_at)
    except json.JSONDecodeError:
        if final:
            return None, None, f"the arguments of the call to {name!r} are not complete JSON"
        return PartialCall(name, text[args_at:], False), None, None
    if not isinstance(arguments, dict):
        return None, None, f"the arguments of the call to {name!r} are not a JSON object"
    call = PartialCall(name, text[args_at:end], True)
    closed = _CLOSE_CALL.match(text, end)
    if closed is not None:
        return call, closed.end(), None
    if not final and not text[end:].strip():
        return call, None, None
    return None, None, f"the call to {name!r} does not end with '}}' after its arguments"


def _whole_object(
    text: str, pos: int, names: frozenset[str]
) -> tuple[PartialCall | None, int | None, str | None]:
    """A call written in another key order: {"arguments": {...}, "name": "f"}."""
    try:
        obj, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None, None, 'a tool call is not a JSON object {"name": ..., "arguments": {...}}'
    arguments = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    name = obj.get("name") if isinstance(obj, dict) else None
    if not isinstance(arguments, dict) or name not in names:
        return None, None, f"{text[pos:end]!r} is not a call of one of the tools {sorted(names)}"
    return PartialCall(name, json.dumps(arguments, ensure_ascii=False), True), end, None


class ToolCallStream:
    """One streamed output -> OpenAI deltas: content pieces, and per call a first delta
    with its index, id and name, then its arguments in pieces. Each feed rescans the text
    so far (outputs are short; one parser serves whole and streamed output alike)."""

    def __init__(self, fmt: ToolFormat, names: frozenset[str]):
        self.fmt, self.names = fmt, names
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, piece: str, final: bool) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) once `piece` is added; final: the output ended."""
        self.text += piece
        scan = scan_output(self.text, self.fmt, self.names, final)
        # Content only grows: held-back text is never shown, and text that is shown is
        # never taken back into a call.
        content = scan.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(scan.content))
        deltas = []
        for index, call in enumerate(scan.calls):
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(len(call.arguments))
                function = {"name": call.name, "arguments": call.arguments}
                deltas.append(
                    {
                        "index": index,
                        "id": self.ids[index],
                        "type": "function",
                        "function": function,
                    }
                )
            elif len(call.arguments) > self.args_sent[index]:
                new = call.arguments[self.args_sent[index] :]
                self.args_sent[index] = len(call.arguments)
                deltas.append({"index": index, "function": {"arguments": new}})
        return content, deltas
