"""Programs run on any OpenAI-compatible server (loom's own `/v1` included).

Chat models (the default) get the program's conversation as messages, so gens go inside
assistant turns; completion models get the prompt text. JSON schemas go as
`response_format` (in the request body for completion models, whose client method has no such
parameter). Regexes are honoured by the language's literal split, unless
`server_grammar=True` says the server enforces them itself (loom, SGLang and vLLM do, as
the extra-body field `regex`). `select` scores choices with prompt logprobs, which only
completion models on servers that echo them (`echo=True`, e.g. vLLM) return; elsewhere it
is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from loom.backends.base import (
    BackendError,
    Capabilities,
    ChoiceScore,
    GenRequest,
    GenResult,
    ProgramBackend,
)

# loom sampling parameter -> the OpenAI request field (None: an extra-body field)
_STANDARD = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}
_EXTRA = {
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "min_new_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}
_NEUTRAL = {
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "ignore_eos": False,
    "stop_token_ids": [],
}


class OpenAI(ProgramBackend):
    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        is_chat_model: bool = True,
        server_grammar: bool = False,
        continue_final_message: bool = False,
        client: Any = None,
        **client_kwargs: Any,
    ):
        """`continue_final_message`: the server can continue a begun assistant message
        (loom and vLLM can); needed where a regex's literal text starts a chat answer."""
        if client is None:
            import openai

            key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            client = openai.OpenAI(base_url=base_url, api_key=key, **client_kwargs)
        self.client = client
        self.model = model or self._first_model()
        self.is_chat_model = is_chat_model
        self.continue_final_message = continue_final_message
        self.capabilities = Capabilities(
            grammar=server_grammar,
            chat_api=is_chat_model,
            scoring=not is_chat_model,
            cache=False,
            continue_text=continue_final_message or not is_chat_model,
        )

    def _first_model(self) -> str:
        models = list(self.client.models.list())
        if not models:
            raise BackendError("the server lists no models; pass model=")
        return models[0].id

    def generate(self, req: GenRequest) -> GenResult:
        response = self._create(req, stream=False)
        choice = response.choices[0]
        text = choice.message.content if self.is_chat_model else choice.text
        return GenResult(text or "", _meta(response.usage, choice.finish_reason))

    def stream(self, req: GenRequest) -> Iterator[GenResult]:
        finish, usage = None, None
        for chunk in self._create(req, stream=True):
            usage = chunk.usage or usage
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            finish = choice.finish_reason or finish
            piece = (choice.delta.content if self.is_chat_model else choice.text) or ""
            if piece:
                yield GenResult(piece, _meta(usage, finish))
        yield GenResult("", _meta(usage, finish))

    def score_choices(
        self, prompt: str, choices: list[str], unconditional: bool = False
    ) -> list[ChoiceScore]:
        """Prompt logprobs of prompt+choice (echo, no new tokens), scored from the first
        token any choice reaches into (the same context for all of them)."""
        texts = [prompt + c for c in choices] + (list(choices) if unconditional else [])
        import openai

        try:
            response = self.client.completions.create(
                model=self.model, prompt=texts, max_tokens=0, echo=True, logprobs=0
            )
        except openai.APIError as e:
            raise BackendError(
                f"select needs prompt logprobs (echo=True), and the server refused them: {e}"
            ) from e
        by_index = sorted(response.choices, key=lambda c: c.index)
        logprobs = [c.logprobs for c in by_index]
        if any(lp is None or not lp.token_logprobs for lp in logprobs):
            raise BackendError("select needs prompt logprobs, and the server returned none")
        n = len(choices)
        start = min(_first_token_after(lp, len(prompt)) for lp in logprobs[:n])
        uncond = [_present(lp.token_logprobs) for lp in logprobs[n:]] or [None] * n
        return [
            ChoiceScore(_present(lp.token_logprobs[start:]), u, tuple(lp.tokens[start:]))
            for lp, u in zip(logprobs[:n], uncond)
        ]

    def _create(self, req: GenRequest, stream: bool) -> Any:
        kwargs = self._request_fields(req.sampling_params)
        if stream:
            kwargs.update(stream=True, stream_options={"include_usage": True})
        import openai

        try:
            if not self.is_chat_model:
                return self.client.completions.create(model=self.model, prompt=req.prompt, **kwargs)
            messages = self._messages(req, kwargs)
            return self.client.chat.completions.create(
                model=self.model, messages=messages, **kwargs
            )
        except openai.APIError as e:
            raise BackendError(f"the OpenAI-compatible server refused the request: {e}") from e

    def _messages(self, req: GenRequest, kwargs: dict) -> list[dict]:
        messages = list(req.messages)
        if not messages:
            raise BackendError("a chat model needs messages: put the gen inside a conversation")
        if messages[-1]["role"] == "assistant":
            if not self.continue_final_message:
                raise BackendError(
                    "this chat server cannot continue a begun assistant message (text before "
                    "a gen in the same assistant turn, or a regex's literal prefix); start "
                    "the gen at the turn's beginning, or pass continue_final_message=True "
                    "if the server supports it (loom and vLLM do)"
                )
            extra = kwargs.setdefault("extra_body", {})
            extra.update(continue_final_message=True, add_generation_prompt=False)
        return messages

    def _request_fields(self, params: dict) -> dict:
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in params.items():
            if key in _STANDARD:
                kwargs[_STANDARD[key]] = value
            elif key in _EXTRA and value != _NEUTRAL[key]:
                extra[_EXTRA[key]] = value
            elif key == "json_schema":
                schema = json.loads(value)
                # The completions API has no response_format parameter in the openai client;
                # servers that take one there (loom, vLLM) read it from the body.
                fields = kwargs if self.is_chat_model else extra
                fields["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema},
                }
            elif key in ("regex", "ebnf"):
                extra[key] = value
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


def _first_token_after(logprobs: Any, prompt_chars: int) -> int:
    """The first token that holds a character past the prompt's end."""
    for i, (offset, token) in enumerate(zip(logprobs.text_offset, logprobs.tokens)):
        if offset + len(token) > prompt_chars:
            return i
    return len(logprobs.tokens) - 1


def _present(values: Any) -> tuple[float, ...]:
    return tuple(v for v in values if v is not None)


def _meta(usage: Any, finish: str | None) -> dict:
    details = getattr(usage, "prompt_tokens_details", None)
    return {
        "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
        "completion_tokens": getattr(usage, "completion_tokens", 0) or 0,
        "cached_tokens": (getattr(details, "cached_tokens", 0) or 0) if details else 0,
        "finish_reason": {"type": finish} if finish else None,
    }
