"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Prompts are tokenized here (chat: with the model's chat template or --chat-template), so
max_tokens is checked against the context length before anything is scheduled. A body
becomes a GenerateInput on a worker thread (`Frontend.off_loop`): parsing, templates and
tokenizing grow with the input, and the event loop serves everyone else meanwhile.
"""

from __future__ import annotations

import inspect
import time
import uuid
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from loom.runtime.engine import Engine
from loom.runtime.http import openai_format as fmt
from loom.runtime.http.body import read_json
from loom.runtime.http.errors import APIError, validation_error
from loom.runtime.http.frontend import Frontend, sse
from loom.runtime.http.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    reject_unsupported,
    sampling_params,
)
from loom.runtime.http.openai_tools import ChatTools, chat_format, chat_tools, conversation
from loom.runtime.tokenizer.inputs import GenerateInput

M = TypeVar("M", bound=BaseModel)


class OpenAIServing:
    def __init__(self, engine: Engine, frontend: Frontend, model_name: str):
        self.tokenizer = engine.tokenizer
        self.frontend = frontend
        self.model_name = model_name
        self.context_len = engine.info.context_length
        self.chat_template = _read_template(engine.args.chat_template)
        self.template_call_args = _parameters(self.tokenizer.apply_chat_template)
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        self.tool_format = chat_format(template, self.tokenizer.get_vocab())
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "loom",
            "max_model_len": self.context_len,
        }

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # ---- completions --------------------------------------------------------------------

    async def completions(self, body: dict, request: Request) -> Response | dict:
        req, obj = await self.frontend.off_loop(self.completion_input, body)
        prepared = await self.frontend.prepare(obj)
        reply = fmt.Reply(_response_id("cmpl", req.rid), self.model_name, req.n, obj.return_logprob)
        reply.continuous_usage = req.continuous_usage()
        if req.stream:
            events = fmt.completion_stream(
                self.frontend.chunks(prepared), reply, req.include_usage()
            )
            return StreamingResponse(sse(events), media_type="text/event-stream")
        results = await self.frontend.result(prepared, request)
        return fmt.completion_response(_as_list(results), reply)

    def completion_input(self, body: dict) -> tuple[CompletionRequest, GenerateInput]:
        req = _parse(CompletionRequest, body)
        self.check_model(req.model)
        reject_unsupported(req)
        prompts, is_batch = self._completion_prompts(req.prompt)
        params = [sampling_params(req, self._max_new(req.max_tokens, len(p))) for p in prompts]
        obj = GenerateInput(
            input_ids=prompts if is_batch else prompts[0],
            sampling_params=params if is_batch else params[0],
            rid=req.rid,  # a batch's prompts are rid-p0, rid-p1, ... (inputs.expand)
            return_logprob=req.logprobs is not None,
            top_logprobs_num=req.logprobs or 0,
            return_text_in_logprobs=True,
            stream=req.stream,
        )
        return req, obj

    def _completion_prompts(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str):
            return [self._tokenize(prompt)], False
        if not prompt:
            raise APIError(400, "`prompt` is an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [self._tokenize(p) for p in prompt], True
        if all(isinstance(t, int) for t in prompt):
            return [list(prompt)], False
        if any(not p for p in prompt):
            raise APIError(400, "`prompt` holds an empty list of token ids", param="prompt")
        return [list(p) for p in prompt], True

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            raise APIError(400, "`prompt` is empty; give some text to complete", param="prompt")
        return self.tokenizer(text).input_ids

    def _max_new(self, requested: int | None, prompt_len: int) -> int:
        room = self.context_len - prompt_len
        if requested is None:
            return max(room, 0)
        if requested > room:
            raise APIError(
                400,
                f"this model's context length is {self.context_len} tokens, but the prompt has "
                f"{prompt_len} and {requested} more were asked for; lower max_tokens to at most "
                f"{max(room, 0)} or shorten the prompt",
                param="max_tokens",
            )
        return requested

    # ---- chat ---------------------------------------------------------------------------

    async def chat(self, body: dict, request: Request) -> Response | dict:
        req, tools, obj = await self.frontend.off_loop(self.chat_input, body)
        prepared = await self.frontend.prepare(obj)
        reply = fmt.Reply(_response_id("chatcmpl", req.rid), self.model_name, req.n, req.logprobs)
        reply.continuous_usage = req.continuous_usage()
        if req.stream:
            chunks = self.frontend.chunks(prepared)
            events = fmt.chat_stream(chunks, reply, req.n, req.include_usage(), tools)
            return StreamingResponse(sse(events), media_type="text/event-stream")
        results = await self.frontend.result(prepared, request)
        return fmt.chat_response(_as_list(results), reply, tools)

    def chat_input(
        self, body: dict
    ) -> tuple[ChatCompletionRequest, ChatTools | None, GenerateInput]:
        req = _parse(ChatCompletionRequest, body)
        self.check_model(req.model)
        reject_unsupported(req)
        tools = chat_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tool_format)
        ids = self._render_chat(req, tools)
        requested = req.max_completion_tokens
        requested = req.max_tokens if requested is None else requested
        params = sampling_params(req, self._max_new(requested, len(ids)))
        if tools is not None:
            params.update(_tool_sampling(req, tools))
        obj = GenerateInput(
            input_ids=ids,
            sampling_params=params,
            rid=req.rid,
            return_logprob=req.logprobs,
            top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0,
            return_text_in_logprobs=True,
            stream=req.stream,
        )
        return req, tools, obj

    def _render_chat(self, req: ChatCompletionRequest, tools: ChatTools | None) -> list[int]:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(
                400,
                "this model has no chat template: start the server with --chat-template FILE, "
                "or send a plain prompt to /v1/completions",
            )
        template_kwargs = req.chat_template_kwargs or {}
        clash = sorted(set(template_kwargs) & self.template_call_args)
        if clash:
            raise APIError(
                400,
                f"chat_template_kwargs may not set {clash}: those are arguments of the "
                "tokenizer's call (loom sets them), not variables of the template",
                param="chat_template_kwargs",
            )
        messages, tool_kwargs = conversation(req.messages, tools, template)
        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                tokenize=True,
                return_dict=False,
                **tool_kwargs,
                **template_kwargs,
            )
        except Exception as e:  # noqa: BLE001 - a template rejecting the conversation
            raise APIError(400, f"the chat template cannot render these messages: {e}") from e
        return list(ids)


def add_openai_routes(app: FastAPI, engine: Engine, frontend: Frontend, model_name: str) -> None:
    serving = OpenAIServing(engine, frontend, model_name)

    @app.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @app.get("/v1/models/{model:path}")  # a hub id holds a slash
    async def model(model: str) -> dict:
        serving.check_model(model)
        return serving.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(await read_json(request), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(await read_json(request), request)


def _tool_sampling(req: ChatCompletionRequest, tools: ChatTools) -> dict:
    """The calls' constraint; it takes the place of any other, so none may be given."""
    fmt = req.response_format
    given = [n for n in ("regex", "ebnf") if getattr(req, n) is not None]
    given += ["response_format"] if fmt is not None and fmt.type != "text" else []
    if given:
        raise APIError(
            400,
            f"tools with tool_choice {tools.choice.mode!r} constrain the output to the calls; "
            f"{given[0]} cannot be combined with them (send tool_choice none, or drop it)",
            param=given[0],
        )
    return tools.sampling()


def _parse(model: type[M], body: dict) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e


def _parameters(fn) -> frozenset[str]:
    """fn's named parameters. For apply_chat_template: what chat_template_kwargs must not
    override (padding or truncation would also change the tokenizer the workers share)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind in named)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _response_id(prefix: str, rid: str | None) -> str:
    return f"{prefix}-{rid or uuid.uuid4().hex}"


def _as_list(results: dict | list[dict]) -> list[dict]:
    return results if isinstance(results, list) else [results]
