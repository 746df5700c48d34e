"""OpenAI request bodies (/v1/completions, /v1/chat/completions) as strict pydantic models,
and their translation into loom's sampling parameters.

Strict: a field of the wrong type is a 400 naming it, never silently coerced. Unknown
fields are rejected too, as OpenAI does; the extra-body fields loom understands (SGLang's
and vLLM's names: top_k, min_p, regex, ebnf, ...) are declared here.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loom.runtime.http.errors import APIError

MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extra body (SGLang / vLLM names).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    regex: str | None = None
    ebnf: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    rid: str | None = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        """Whether every chunk of a stream carries the usage so far (vLLM's extension)."""
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's past calls

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Checked by loom.constrain.tools.spec (a 400 that names the field to fix).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def reject_unsupported(req: _Sampling) -> None:
    """Fields loom accepts but cannot honour: a 400 rather than a silently different answer."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if req.store:
        raise APIError(
            400, "store: true is not supported; loom keeps no completions", param="store"
        )
    if req.service_tier not in (None, "auto", "default"):
        raise APIError(
            400,
            f"service_tier {req.service_tier!r} is not supported; loom serves one tier "
            "(auto / default)",
            param="service_tier",
        )
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported; prepend the prompt yourself", param="echo")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs is False and req.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def sampling_params(req: _Sampling, max_new_tokens: int) -> dict:
    """The loom sampling parameters of one completion of `req`."""
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min(req.min_tokens, max_new_tokens),
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "no_stop_trim": req.no_stop_trim,
        "n": req.n,
        "seed": req.seed,
    }
    for name in ("top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            params[name] = getattr(req, name)
    params.update(_constraint(req))
    return params


def _constraint(req: _Sampling) -> dict:
    given = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(
                400,
                "response_format json_schema needs `json_schema: {name, schema}`",
                param="response_format",
            )
        given["response_format"] = {
            "json_schema": json.dumps(fmt.json_schema.schema_),
            # OpenAI's strict=false asks for best effort: keywords the grammar cannot
            # enforce are then allowed (and checked after generation), and the schema
            # keeps JSON Schema's meaning (extra keys where it does not forbid them).
            "json_schema_lenient": fmt.json_schema.strict is False,
            "json_schema_strict": fmt.json_schema.strict is not False,
        }
    if req.regex is not None:
        given["regex"] = {"regex": req.regex}
    if req.ebnf is not None:
        given["ebnf"] = {"ebnf": req.ebnf}
    if len(given) > 1:
        raise APIError(400, f"give at most one of {sorted(given)}; got several", param=None)
    return next(iter(given.values()), {})
