"""The FastAPI app over an Engine: the native API (SGLang's field names) and, mounted from
openai_api, the OpenAI-compatible one.

The app must be served on the Engine's event loop (`loom.runtime.http.launch` does that):
its handlers call the tokenizer manager directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loom.runtime.engine import Engine
from loom.runtime.http.body import read_json
from loom.runtime.http.errors import APIError, install_error_handlers
from loom.runtime.http.frontend import Frontend, sse
from loom.runtime.http.guard import Guard
from loom.runtime.http.metrics import CONTENT_TYPE
from loom.runtime.http.request_log import RequestIds
from loom.runtime.http.tokenizer_files import add_tokenizer_routes
from loom.runtime.tokenizer.inputs import GenerateInput
from loom.version import __version__

HEALTH_GENERATE_TIMEOUT = 30.0
_GENERATE_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateInput))


def served_model_name(engine: Engine) -> str:
    args = engine.args
    return args.served_model_name or args.model_path or os.path.basename(engine.model_folder)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """`api_key`: what every route but the health checks and /metrics requires (guard.py).
    Given here, not in engine.args, so it never reaches the Engine's child processes nor
    /server_info."""
    frontend = Frontend(
        engine.manager,
        engine.info.max_running_requests,
        engine.args.max_queued_requests,
        served_model_name(engine),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if asyncio.get_running_loop() is not engine.loop:
            raise RuntimeError("serve this app on engine.loop (see loom.runtime.http.launch)")
        yield
        frontend.close()

    app = FastAPI(title="loom", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.frontend = frontend
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=engine.args.max_request_body_bytes)
    app.add_middleware(RequestIds, metrics=frontend.metrics)  # outermost: ids every answer
    install_error_handlers(app)
    _add_native_routes(app, engine, frontend)
    add_tokenizer_routes(app, engine.tokenizer, frontend)
    from loom.runtime.http.openai_api import add_openai_routes

    add_openai_routes(app, engine, frontend, served_model_name(engine))
    return app


def _add_native_routes(app: FastAPI, engine: Engine, frontend: Frontend) -> None:
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        prepared = await frontend.prepare(generate_input(await read_json(request)))
        if prepared.obj.stream:
            return StreamingResponse(sse(frontend.chunks(prepared)), media_type="text/event-stream")
        return JSONResponse(await frontend.result(prepared, request))

    @app.get("/health")
    async def health() -> Response:
        if frontend.dead is not None:
            return _dead_response(frontend.dead)
        return JSONResponse({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if frontend.dead is not None:
            return _dead_response(frontend.dead)
        try:
            await asyncio.wait_for(_generate_one_token(frontend, request), HEALTH_GENERATE_TIMEOUT)
        except asyncio.TimeoutError as e:
            raise APIError(
                503, f"generating one token took over {HEALTH_GENERATE_TIMEOUT:.0f}s"
            ) from e
        return JSONResponse({"status": "ok"})

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's name: its frontend's RuntimeEndpoint asks it
    async def model_info() -> dict:
        return {
            "model_path": engine.args.model_path or engine.model_folder,
            "model_folder": engine.model_folder,
            "tokenizer_path": engine.args.tokenizer_path or engine.model_folder,
            "served_model_name": served_model_name(engine),
            "context_length": engine.info.context_length,
            "vocab_size": engine.info.vocab_size,
            "is_generation": True,
            "has_chat_template": bool(getattr(engine.tokenizer, "chat_template", None)),
        }

    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's name
    async def server_info() -> dict:
        info = await frontend.server_info()
        return {
            "version": __version__,
            "served_model_name": served_model_name(engine),
            "model_folder": engine.model_folder,
            "args": _shown_args(engine),
            **dataclasses.asdict(info),
            "tokens_in_use": info.tokens_in_use,
            "in_flight_requests": frontend.in_flight,
            "preparing_requests": frontend.preparing,
            "process_ids": {"server": os.getpid(), **engine.process_ids},
        }

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        if frontend.dead is not None:
            return _dead_response(frontend.dead)
        result = await engine.manager.flush_cache()
        if not result.ok:
            raise APIError(400, f"the cache was not flushed: {result.message}")
        return JSONResponse({"status": "ok", "message": "the prefix cache is empty"})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict:
        rid = (await read_json(request)).get("rid")
        if not isinstance(rid, str):
            raise APIError(400, "give the request id to abort as `rid` (a string)", param="rid")
        aborted = frontend.abort(rid)
        if not aborted:
            raise APIError(404, f"no request with id {rid!r} is in flight", param="rid")
        return {"aborted": aborted}

    @app.get("/metrics")
    async def metrics() -> Response:
        info = None if frontend.dead is not None else await frontend.server_info()
        body = frontend.metrics.render(info, alive=frontend.dead is None)
        return Response(body, media_type=CONTENT_TYPE)


async def _generate_one_token(frontend: Frontend, request: Request) -> None:
    obj = GenerateInput(
        input_ids=[0],
        sampling_params={"max_new_tokens": 1, "temperature": 0},
        rid=f"health-{uuid.uuid4().hex}",
    )
    await frontend.result(await frontend.prepare(obj, admit=False), request)


def generate_input(body: dict) -> GenerateInput:
    """A /generate body -> GenerateInput, with 400s for fields the Engine would misread."""
    unknown = sorted(set(body) - set(_GENERATE_FIELDS))
    if unknown:
        raise APIError(400, f"unknown field(s) {unknown}; /generate takes {list(_GENERATE_FIELDS)}")
    for name in ("stream", "return_text_in_logprobs"):
        if not isinstance(body.get(name, False), bool):
            raise APIError(400, f"`{name}` must be true or false", param=name)
    rid = body.get("rid")
    if rid is not None and not (
        isinstance(rid, str) or (isinstance(rid, list) and all(isinstance(r, str) for r in rid))
    ):
        raise APIError(400, "`rid` must be a string (or a list of them for a batch)", param="rid")
    return GenerateInput(**body)


def _shown_args(engine: Engine) -> dict:
    """The server's arguments, less the API key (create_app keeps it out of engine.args;
    an Engine built with one by hand must not show it either)."""
    args = dataclasses.asdict(engine.args)
    args.pop("api_key", None)
    return args


def _dead_response(reason: str) -> Response:
    return APIError(503, f"unhealthy: {reason}", code="engine_dead").response()
