"""The native HTTP API of a live `loom serve` (started through loom.Runtime) on a tiny Llama:
/generate single, batch and streamed, the Engine as reference, disconnects and aborts,
health, info and cache endpoints, input errors (metrics and logs: test_server_ops)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from loom.backends.runtime import Runtime
from loom.runtime.engine import Engine
from loom.runtime.sampling.params import InvalidRequestError
from tests.http_helpers import (
    alive,
    ipc_dirs,
    is_idle,
    server_info,
    server_pids,
    sse_events,
    wait_until,
)

GREEDY = {"temperature": 0, "ignore_eos": True}
SERVER_ARGS = dict(device="cpu", max_total_tokens=32768, grammar_backend="none")
LONG = {**GREEDY, "max_new_tokens": 16000}  # long_llama's context is 16384
WAIT_S = 60  # bounds on waits and answers that only a hang would reach
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def chat_template(tmp_path_factory) -> str:
    """The tiny model has no chat template: one that joins the messages' words."""
    path = tmp_path_factory.mktemp("template") / "words.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return str(path)


@pytest.fixture(scope="module")
def runtime(long_llama, tmpdir_env, chat_template):
    with Runtime(long_llama, **SERVER_ARGS, chat_template=chat_template) as rt:
        yield rt


@pytest.fixture
def url(runtime):
    yield runtime.url
    # every test leaves the server idle for the next
    assert wait_until(lambda: is_idle(server_info(runtime.url)), WAIT_S)


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=WAIT_S, **kw)


def test_generate_returns_text_ids_and_meta(url):
    r = post(
        url,
        "/generate",
        {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, "max_new_tokens": 4}},
    )
    assert r.status_code == 200
    out = r.json()
    assert len(out["output_ids"]) == 4
    assert out["text"] == words(out["output_ids"])
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "matched": None}


def test_generate_batch_returns_a_list_in_order(url):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = {**GREEDY, "max_new_tokens": 3}
    batch = post(url, "/generate", {"input_ids": prompts, "sampling_params": params}).json()
    singles = [
        post(url, "/generate", {"input_ids": p, "sampling_params": params}).json() for p in prompts
    ]
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [3, 2, 4]


def test_stream_deltas_concatenate_to_the_result_and_end_with_done(url):
    body = {"text": "t5 t6 t7", "sampling_params": {**GREEDY, "max_new_tokens": 6}}
    whole = post(url, "/generate", body).json()
    with httpx.stream(
        "POST", url + "/generate", json={**body, "stream": True}, timeout=WAIT_S
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum((c["output_ids"] for c in chunks), []) == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_32_concurrent_streams_equal_the_engine_greedy_results(url, long_llama):
    prompts = [words([5 + i, 7 + 2 * i, 100 + i]) for i in range(32)]
    params = {**GREEDY, "max_new_tokens": 12}
    with Engine(long_llama, **SERVER_ARGS) as engine:
        expected = [r["text"] for r in engine.generate(prompts, params)]

    async def stream_one(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"text": prompt, "sampling_params": params, "stream": True}
        async with client.stream("POST", "/generate", json=body) as r:
            events = [e async for e in _aevents(r)]
        assert events[-1] == "[DONE]"
        return "".join(e["text"] for e in events[:-1])

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    assert asyncio.run(run()) == expected


async def _aevents(response: httpx.Response):
    async for line in response.aiter_lines():
        for event in sse_events([line]):
            yield event


def test_dropping_a_stream_aborts_it_and_frees_its_kv(url):
    before = server_info(url)["generation_tokens_total"]
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        for _ in range(3):
            next(events)
    # Leaving the block closed the connection mid-stream.
    assert wait_until(lambda: is_idle(server_info(url)), WAIT_S)
    assert server_info(url)["generation_tokens_total"] - before < LONG["max_new_tokens"]


def test_dropping_a_non_stream_request_aborts_it(url):
    before = server_info(url)["generation_tokens_total"]
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the 16000 tokens
        httpx.post(url + "/generate", json=body, timeout=httpx.Timeout(WAIT_S, read=0.3))
    assert wait_until(lambda: is_idle(server_info(url)), WAIT_S)
    assert server_info(url)["generation_tokens_total"] - before < LONG["max_new_tokens"]


def test_abort_request_ends_a_running_stream_with_abort(url):
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True, "rid": "stop-me"}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        aborted = post(url, "/abort_request", {"rid": "stop-me"})
        assert aborted.status_code == 200 and aborted.json() == {"aborted": ["stop-me"]}
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert post(url, "/abort_request", {"rid": "stop-me"}).status_code == 404


def test_abort_of_an_id_spares_requests_whose_ids_merely_start_with_it(url):
    """`job` once aborted another client's `job-7` too (issue 17): ids match exactly."""
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True, "rid": "job-7"}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        assert post(url, "/abort_request", {"rid": "job"}).status_code == 404
        assert server_info(url)["running_requests"] == 1
        next(events)  # job-7 still streams
        assert post(url, "/abort_request", {"rid": "job-7"}).json() == {"aborted": ["job-7"]}
        rest = list(events)
    assert rest[-2]["meta_info"]["finish_reason"]["type"] == "abort"


def test_abort_of_an_id_reaches_the_completions_loom_derived_from_it(url):
    """n > 1 runs one request per completion (rid-0, rid-1): the caller's id stops them all."""
    params = {**LONG, "n": 2}
    body = {"input_ids": [5, 6, 7], "sampling_params": params, "stream": True, "rid": "pair"}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        aborted = post(url, "/abort_request", {"rid": "pair"})
        assert aborted.json() == {"aborted": ["pair-0", "pair-1"]}
        ends = [e for e in events if e != "[DONE]" and e["meta_info"]["finish_reason"]]
    assert sorted(e["index"] for e in ends) == [0, 1]
    assert {e["meta_info"]["finish_reason"]["type"] for e in ends} == {"abort"}


def test_a_batch_under_one_rid_gets_an_id_per_prompt(url):
    """Its prompts once shared the one id, and the second's outputs went to the first."""
    params = {**GREEDY, "max_new_tokens": 2}
    body = {"input_ids": [[5, 6], [7, 8]], "sampling_params": params, "rid": "both"}
    results = post(url, "/generate", body).json()
    assert [r["meta_info"]["id"] for r in results] == ["both-p0", "both-p1"]
    assert all(len(r["output_ids"]) == 2 for r in results)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{", "not valid JSON"),
        ({"input_ids": [[5], [6]], "rid": ["twice", "twice"]}, "more than one request"),
        ({"text": "t5", "return_logprob": "yes"}, "return_logprob"),
        ([1, 2], "JSON object"),
        ({}, "exactly one of"),
        ({"text": "t5", "prompt": "t5"}, "unknown field"),
        ({"text": "t5", "stream": "yes"}, "stream"),
        ({"text": "t5", "rid": 7}, "rid"),
        ({"text": "t5", "sampling_params": {"temperature": "hot"}}, "temperature"),
        ({"text": "t5", "sampling_params": {"max_tokens": 3}}, "unknown sampling parameter"),
        ({"text": ""}, "empty"),
        ({"input_ids": [5] * 16400}, "context length"),
        ({"text": "t5", "sampling_params": {"max_new_tokens": 10**7}}, "at most 16383"),
        ({"input_ids": [5, 9999]}, "outside"),
    ],
)
def test_bad_requests_get_400_saying_what_to_fix(url, body, message):
    if isinstance(body, bytes):
        r = httpx.post(url + "/generate", content=body, headers=JSON_TYPE, timeout=WAIT_S)
    else:
        r = post(url, "/generate", body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_health_and_health_generate_are_ok(url):
    assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200
    assert httpx.get(url + "/health_generate", timeout=WAIT_S).status_code == 200


def test_model_info_and_server_info_describe_the_server(url, long_llama):
    model = httpx.get(url + "/model_info", timeout=WAIT_S).json()
    assert model["model_path"] == long_llama and model["context_length"] == 16384
    info = server_info(url)
    pool = SERVER_ARGS["max_total_tokens"]
    assert info["max_total_tokens"] == pool and info["args"]["max_total_tokens"] == pool
    assert info["available_tokens"] + info["cache_tokens"] == info["max_total_tokens"]
    assert set(info["process_ids"]) == {"server", "scheduler", "detokenizer"}


def test_sglang_frontend_requests_are_understood(url):
    """SGLang's RuntimeEndpoint asks /get_model_info and sends every sampling field it
    knows, unset ones as null (stop_regex among them)."""
    info = httpx.get(url + "/model_info", timeout=WAIT_S).json()
    assert httpx.get(url + "/get_model_info", timeout=WAIT_S).json() == info
    params = {"max_new_tokens": 2, "temperature": 0, "stop_regex": None, "regex": None, "n": 1}
    response = post(url, "/generate", {"text": "Hello", "sampling_params": params})
    assert response.status_code == 200
    assert response.json()["meta_info"]["completion_tokens"] == 2


def test_flush_cache_empties_the_prefix_cache(url):
    post(url, "/generate", {"input_ids": [9, 8, 7, 6], "sampling_params": {"max_new_tokens": 2}})
    assert server_info(url)["cache_tokens"] > 0
    assert httpx.post(url + "/flush_cache", timeout=WAIT_S).status_code == 200
    assert server_info(url)["cache_tokens"] == 0


def test_runtime_endpoint_generates_like_the_engine(runtime):
    endpoint = runtime.endpoint
    params = {**GREEDY, "max_new_tokens": 4}
    out = endpoint.generate("t5 t6 t7", params)
    chunks = list(endpoint.generate("t5 t6 t7", params, stream=True))
    assert "".join(c["text"] for c in chunks) == out["text"] == words(out["output_ids"])
    with pytest.raises(InvalidRequestError, match="top_p"):
        endpoint.generate("t5", {"top_p": 0})
    assert endpoint.health()


def test_requests_while_others_stream_are_served(url):
    """A quick request is answered while a long stream is still running (its 16000
    tokens take minutes on CPU); the stream then ends only because it is aborted."""
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True, "rid": "long"}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        quick = post(url, "/generate", {"input_ids": [9], "sampling_params": {"max_new_tokens": 1}})
        assert quick.status_code == 200 and len(quick.json()["output_ids"]) == 1
        assert server_info(url)["running_requests"] == 1  # the stream, still going
        assert post(url, "/abort_request", {"rid": "long"}).json() == {"aborted": ["long"]}
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["meta_info"]["finish_reason"]["type"] == "abort"


def test_chat_template_flag_renders_the_conversation(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=WAIT_S)
    messages = [{"role": "user", "content": "t5 t6"}, {"role": "user", "content": "t7"}]
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.prompt_tokens == 3
    same = post(
        url,
        "/generate",
        {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, "max_new_tokens": 4}},
    )
    assert chat.choices[0].message.content == same.json()["text"]


def test_runtime_shutdown_leaves_no_process_or_socket(runtime, tmpdir_env):
    """Last: stops the module's server."""
    pids = server_pids(runtime.process.pid)
    assert len(pids) == 3 and ipc_dirs(tmpdir_env)
    runtime.shutdown()
    assert runtime.process.returncode == 0
    assert not [p for p in pids if alive(p)]
    assert ipc_dirs(tmpdir_env) == []
