"""Running a gen or a select on the backend, for one executor.

Regex gens: the literal text a regex forces at its start is appended as prompt text and
only the rest is generated (the server's jump-forward covers later literals). On a backend
without server-side grammars the whole regex is honoured by its literal split: literal
parts as text, each free part generated with the next literal as its stop and cut to its
longest match, the result checked against the full regex.

JSON-schema gens: the schema's fixed structure (loom.lang.schema_split) is appended as prompt
text, and each free part is its own request: its sub-schema as `json_schema` (on an OpenAI
API, `response_format`), or its regex (a plain string, number, boolean or enum value with
the character after it) as a regex gen, which a backend without server-side grammars
honours by the literal split above (the output before a stop must match whole). Free parts
share the gen's max_tokens (literal text costs none). The pieces make the variable's value,
which must parse and validate against the whole schema; a part cut off by max_tokens ends
the gen there (finish_reason length, with a message). The split needs a backend that
continues text the program wrote; elsewhere, and with `split_literals=False`, the schema
goes whole in one request, as it does when nothing in it is fixed. The request graph still
shows one gen node: the split happens when the gen runs.
"""

from __future__ import annotations

import json
from typing import Any

from loom.backends.base import GenRequest
from loom.constrain.regex import fullmatch, longest_match, split_prefix, split_regex
from loom.constrain.schema_check import validate_output
from loom.lang.errors import LoomError
from loom.lang.executor import Executor
from loom.lang.ir import Gen, Select
from loom.lang.schema_split import Free, Literal, split_schema_text
from loom.lang.tool_gen import prepare_tool_gen, tool_calls_meta

_NO_CALL_META = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
_OUTPUT_LISTS = ("output_token_logprobs", "output_top_logprobs")  # one entry per token


def run_gen(ex: Executor, g: Gen) -> None:
    params = g.params.merged(ex.ctx.defaults)
    caps = ex.ctx.backend.capabilities
    if caps.chat_api and ex.role != "assistant":
        raise LoomError(
            f"gen {g.name!r}: {type(ex.ctx.backend).__name__} is a chat API; put gens inside "
            "an assistant turn (s += loom.assistant(loom.gen(...)))"
        )
    split = bool(_pick(g.split_literals, ex.ctx.defaults.get("split_literals"), True))
    if g.tools is not None:
        fmt = prepare_tool_gen(ex, g, params)
        value, meta = _complete(ex, g, params, append=True)
        meta = tool_calls_meta(g, fmt, value, meta)
    elif "regex" in params and not caps.grammar:
        if not split:
            raise LoomError(
                f"gen {g.name!r}: {type(ex.ctx.backend).__name__} cannot enforce regexes while "
                "decoding, so split_literals=False cannot honour this regex; leave the split on"
            )
        value, meta = _gen_by_literal_split(ex, g, params)
    elif "json_schema" in params and split and caps.continue_text:
        value, meta = _gen_json_by_parts(ex, g, params)
    else:
        value, meta = _gen_after_prefix(ex, g, params, split)
    ex.seen = len(ex.text)
    if g.name is not None:
        ex.set_var(g.name, _parse(value, g), meta)


def _gen_after_prefix(ex: Executor, g: Gen, params: dict, split: bool) -> tuple[str, dict]:
    prefix = ""
    if "regex" in params and split:
        prefix, rest = split_prefix(params["regex"])
        ex.append(prefix, g.name)
        if not rest:
            return prefix, {**_NO_CALL_META, "finish_reason": {"type": "stop"}}
        params["regex"] = rest
    text, meta = _complete(ex, g, params, append=True)
    return prefix + text, meta


def _gen_by_literal_split(
    ex: Executor, g: Gen, params: dict, strict: bool = False
) -> tuple[str, dict]:
    """`strict`: a free part's output must match whole (not be cut to its longest match),
    and one cut off by max_tokens ends the split as it is, for the caller to report."""
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
        if strict and (meta.get("finish_reason") or {}).get("type") == "length":
            ex.append(text, g.name)
            return value + text, _combined([*metas, meta])
        piece = longest_match(part.text, text)
        if piece is None or (strict and piece != text):
            raise LoomError(_split_failure(g, regex, part.text, text))
        ex.append(piece, g.name)
        value += piece
        metas.append(meta)
    if not fullmatch(regex, value):
        raise LoomError(_split_failure(g, regex, regex, value))
    return value, _combined(metas)


def _gen_json_by_parts(ex: Executor, g: Gen, params: dict) -> tuple[str, dict]:
    schema_text = params.pop("json_schema")
    segments = split_schema_text(schema_text, ex.ctx.backend.capabilities.grammar)
    if len(segments) == 1 and isinstance(segments[0], Free) and segments[0].regex is None:
        return _complete(ex, g, {**params, "json_schema": schema_text}, append=True)
    budget = params.get("max_new_tokens")
    free_parts = sum(isinstance(seg, Free) for seg in segments)
    value, metas = "", []
    for seg in segments:
        if isinstance(seg, Literal):
            ex.append(seg.text, g.name)
            value += seg.text
            continue
        left = None if budget is None else budget - sum(_completion(m) for m in metas)
        if left is not None and left <= 0:
            return value, _cut_off(metas, len(metas) + 1, free_parts, {"type": "length"})
        piece, meta = _gen_free_part(
            ex, g, params if left is None else {**params, "max_new_tokens": left}, seg
        )
        value += piece
        metas.append(meta)
        reason = meta.get("finish_reason") or {"type": "stop"}
        if reason.get("type") != "stop":
            return value, _cut_off(metas, len(metas), free_parts, reason)
    problem = validate_output(json.loads(schema_text), value)
    if problem is not None:
        raise LoomError(
            f"gen {g.name!r}: the JSON put together from the schema's literal text and the "
            f"generated parts, {value!r}, is not valid: {problem}"
        )
    return value, _combined(metas)


def _gen_free_part(ex: Executor, g: Gen, params: dict, part: Free) -> tuple[str, dict]:
    grammar = ex.ctx.backend.capabilities.grammar
    if part.regex is not None and grammar:
        return _gen_after_prefix(ex, g, {**params, "regex": part.regex}, split=True)
    if part.regex is not None:
        try:
            return _gen_by_literal_split(ex, g, {**params, "regex": part.regex}, strict=True)
        except LoomError as e:
            raise LoomError(f"{e} (the regex stands for the schema part {part.schema})") from e
    sub = {**params, "json_schema": json.dumps(part.schema)}
    if grammar:
        return _complete(ex, g, sub, append=True)
    # The server's response_format holds the output to the sub-schema; a server that
    # ignores it may write on past the value, which is cut here.
    text, meta = _complete(ex, g, sub, append=False)
    piece = _json_value_prefix(text)
    if piece is None:
        raise LoomError(
            f"gen {g.name!r}: the model's output {text!r} does not start with a JSON value "
            f"for the part {part.schema!r} of the schema; this backend does not enforce the "
            "schema (no response_format support?)"
        )
    ex.append(piece, g.name)
    return piece, meta


def _json_value_prefix(text: str) -> str | None:
    """The first JSON value in `text` (with the whitespace before it), or None."""
    stripped = text.lstrip()
    try:
        _, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    return text[: len(text) - len(stripped) + end]


def _cut_off(metas: list[dict], part: int, parts: int, reason: dict) -> dict:
    kind = reason.get("type")
    why = reason.get("message") or (
        "max_tokens ran out (raise max_tokens)" if kind == "length" else f"finish reason {kind!r}"
    )
    message = f"the JSON stops in its generated part {part} of {parts}: {why}"
    return {**_combined(metas), "finish_reason": {**reason, "message": message}}


def _completion(meta: dict) -> int:
    return meta.get("completion_tokens", 0)


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
    """One gen's meta info from its requests': the prompt (and its cached tokens) of the
    first, the completion tokens (and their logprobs) of all, the finish reason of the last;
    each request's own under "parts"."""
    if not metas:
        return {**_NO_CALL_META, "finish_reason": {"type": "stop"}}
    total = {
        "prompt_tokens": metas[0].get("prompt_tokens", 0),
        "completion_tokens": sum(_completion(m) for m in metas),
        "cached_tokens": metas[0].get("cached_tokens", 0),
        "finish_reason": metas[-1].get("finish_reason"),
    }
    if len(metas) == 1:
        return {**metas[0], **total}
    for key in _OUTPUT_LISTS:
        if any(key in m for m in metas):
            total[key] = [entry for m in metas for entry in m.get(key) or []]
    return {**total, "parts": metas}


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
