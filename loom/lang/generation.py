"""Running a gen or a select on the backend, for one executor.

Regex gens: the literal text a regex forces at its start is appended as prompt text and
only the rest is generated (the server's jump-forward covers later literals). On a backend
without server-side grammars the whole regex is honoured by its literal split: literal
parts as text, each free part generated with the next literal as its stop and cut to its
longest match, the result checked against the full regex.
"""

from __future__ import annotations

import json
from typing import Any

from loom.backends.base import GenRequest
from loom.constrain.regex import fullmatch, longest_match, split_prefix, split_regex
from loom.lang.errors import LoomError
from loom.lang.executor import Executor
from loom.lang.ir import Gen, Select

_NO_CALL_META = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}


def run_gen(ex: Executor, g: Gen) -> None:
    params = g.params.merged(ex.ctx.defaults)
    caps = ex.ctx.backend.capabilities
    if caps.chat_api and ex.role != "assistant":
        raise LoomError(
            f"gen {g.name!r}: {type(ex.ctx.backend).__name__} is a chat API; put gens inside "
            "an assistant turn (s += loom.assistant(loom.gen(...)))"
        )
    if "regex" in params and not caps.grammar:
        value, meta = _gen_by_literal_split(ex, g, params)
    else:
        value, meta = _gen_after_prefix(ex, g, params)
    ex.seen = len(ex.text)
    if g.name is not None:
        ex.set_var(g.name, _parse(value, g), meta)


def _gen_after_prefix(ex: Executor, g: Gen, params: dict) -> tuple[str, dict]:
    prefix = ""
    if "regex" in params:
        prefix, rest = split_prefix(params["regex"])
        ex.append(prefix, g.name)
        if not rest:
            return prefix, {**_NO_CALL_META, "finish_reason": {"type": "stop"}}
        params["regex"] = rest
    text, meta = _complete(ex, g, params, append=True)
    return prefix + text, meta


def _gen_by_literal_split(ex: Executor, g: Gen, params: dict) -> tuple[str, dict]:
    regex = params.pop("regex")
    parts = split_regex(regex)
    value, metas = "", []
    for i, part in enumerate(parts):
        if part.literal:
            ex.append(part.text, g.name)
            value += part.text
            continue
        following = parts[i + 1].text if i + 1 < len(parts) else None
        sub = {**params, "stop": [following]} if following else _without(params, "stop")
        text, meta = _complete(ex, g, sub, append=False)
        piece = longest_match(part.text, text)
        if piece is None:
            raise LoomError(_split_failure(g, regex, part.text, text))
        ex.append(piece, g.name)
        value += piece
        metas.append(meta)
    if not fullmatch(regex, value):
        raise LoomError(_split_failure(g, regex, regex, value))
    return value, _combined(metas)


def _split_failure(g: Gen, regex: str, part: str, text: str) -> str:
    return (
        f"gen {g.name!r}: this backend cannot enforce regexes while decoding, and the model's "
        f"output {text!r} does not match {part!r} (of regex {regex!r}); use a backend with "
        "server-side grammars (Engine, RuntimeEndpoint) for this regex"
    )


def _complete(ex: Executor, g: Gen, params: dict, append: bool) -> tuple[str, dict]:
    defaults = ex.ctx.defaults
    req = GenRequest(
        ex.text,
        params,
        _chat_messages(ex) if ex.ctx.backend.capabilities.chat_api else (),
        bool(_pick(g.return_logprob, defaults.get("return_logprob"), False)),
        int(_pick(g.top_logprobs_num, defaults.get("top_logprobs_num"), 0)),
    )
    backend = ex.ctx.backend
    if ex.stream_log is None or not append:
        result = backend.generate(req)
        if append:
            ex.append(result.text, g.name)
        return result.text, result.meta_info
    text, meta = "", {}
    for piece in backend.stream(req):
        ex.append(piece.text, g.name)
        text += piece.text
        meta = piece.meta_info
    return text, meta


def _chat_messages(ex: Executor) -> tuple[dict, ...]:
    """The conversation so far; an assistant turn already begun is its last message."""
    messages = [dict(m) for m in ex.messages]
    partial = ex.text[ex.role_start :] if ex.role == "assistant" else ""
    if partial:
        messages.append({"role": "assistant", "content": partial})
    return tuple(messages)


def _parse(value: str, g: Gen) -> Any:
    if g.dtype is None:
        return value
    try:
        if g.dtype is bool:
            return value.strip() in ("True", "true")
        if g.dtype is str:
            return json.loads(value) if value.startswith('"') else value
        return g.dtype(value.strip())
    except ValueError as e:
        raise LoomError(f"gen {g.name!r}: cannot read {value!r} as {g.dtype.__name__}") from e


def _combined(metas: list[dict]) -> dict:
    if not metas:
        return {**_NO_CALL_META, "finish_reason": {"type": "stop"}}
    total = {
        "prompt_tokens": metas[0].get("prompt_tokens", 0),
        "completion_tokens": sum(m.get("completion_tokens", 0) for m in metas),
        "cached_tokens": sum(m.get("cached_tokens", 0) for m in metas),
        "finish_reason": metas[-1].get("finish_reason"),
    }
    return {**total, "parts": metas} if len(metas) > 1 else {**metas[0], **total}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)


# ---- select --------------------------------------------------------------------------------


def run_select(ex: Executor, sel: Select) -> None:
    backend = ex.ctx.backend
    if not backend.capabilities.scoring:
        raise LoomError(
            f"select {sel.name!r}: {type(backend).__name__} returns no prompt logprobs here, "
            "so it cannot score choices; use gen(..., regex='a|b') there, or run the program "
            "on an Engine or a RuntimeEndpoint"
        )
    scores = backend.score_choices(ex.text, list(sel.choices), sel.method.needs_unconditional)
    decision = sel.method.decide(sel.choices, scores)
    chosen = scores[decision.index]
    ex.append(sel.choices[decision.index], sel.name)
    ex.seen = len(ex.text)
    if sel.name is not None:
        meta = {
            "prompt_tokens": chosen.prompt_tokens,
            "completion_tokens": 0,
            "cached_tokens": chosen.cached_tokens,
            "finish_reason": {"type": "select"},
            **decision.meta_info,
        }
        ex.set_var(sel.name, sel.choices[decision.index], meta)
