"""What an operator reads off a live `loom serve` (a tiny Llama): a Prometheus scrape with
vLLM's standard series, labelled with the model's name; a request id from X-Request-Id (or
`rid`, or made up) in the response header, the scheduler and every log line about the
request; one log format for every process; the scheduler's periodic load line."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loom.backends.runtime import Runtime
from tests.http_helpers import is_idle, server_info, sse_events, wait_until

GREEDY = {"temperature": 0, "ignore_eos": True}
LONG = {**GREEDY, "max_new_tokens": 16000}  # long_llama's context is 16384
WAIT_S = 60
SERVER_ARGS = dict(device="cpu", max_total_tokens=32768, grammar_backend="none", log_interval=0.3)
# The series vLLM's Grafana dashboards and autoscalers read.
VLLM_SERIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
]
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) *"
    r"\[(server|scheduler|detokenizer)( rid=(\S+))?\] "
)


@pytest.fixture(scope="module")
def runtime(long_llama, tmpdir_env):
    with Runtime(long_llama, **SERVER_ARGS) as rt:
        yield rt


@pytest.fixture
def url(runtime):
    yield runtime.url
    assert wait_until(lambda: is_idle(server_info(runtime.url)), WAIT_S)


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=WAIT_S, **kw)


def scrape(url: str) -> list:
    text = httpx.get(url + "/metrics", timeout=WAIT_S).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found)


def stream_then_abort(url: str, rid: str) -> list:
    """A long stream under X-Request-Id `rid`, aborted by that id after its first tokens."""
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True}
    headers = {"X-Request-Id": rid}
    with httpx.stream("POST", url + "/generate", json=body, headers=headers, timeout=WAIT_S) as r:
        assert r.headers["x-request-id"] == rid
        events = sse_events(r.iter_lines())
        next(events)
        assert post(url, "/abort_request", {"rid": rid}).json() == {"aborted": [rid]}
        return list(events)


def test_a_scrape_has_vllms_series_labelled_with_the_model_name(url, runtime):
    model = httpx.get(url + "/v1/models", timeout=WAIT_S).json()["data"][0]["id"]
    before = scrape(url)
    body = {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, "max_new_tokens": 3}}
    with httpx.stream(
        "POST", url + "/generate", json={**body, "stream": True}, timeout=WAIT_S
    ) as r:
        list(r.iter_lines())
    stream_then_abort(url, "metrics-abort")
    assert post(url, "/generate", {"input_ids": []}).status_code == 400
    after = scrape(url)

    names = {s.name for s in after}
    assert not [n for n in VLLM_SERIES if n not in names]
    assert not [s.name for s in after if s.labels.get("model_name") != model]
    assert not [n for n in names if n.endswith("_created")]

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert grew("vllm:request_success_total", finished_reason="abort") == 1
    assert grew("loom:aborted_requests_total", by="client") == 1
    assert grew("loom:http_errors_total", status="400") == 1
    assert grew("vllm:request_queue_time_seconds_count") == 2
    assert grew("vllm:time_to_first_token_seconds_count") == 2
    assert grew("vllm:prompt_tokens_total") == 6
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "loom:scheduler_up") == 1


def test_a_request_is_known_by_its_x_request_id_or_rid(url):
    body = {"input_ids": [5, 6], "sampling_params": {**GREEDY, "max_new_tokens": 1}}
    given = post(url, "/generate", body, headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == given.json()["meta_info"]["id"] == "trace-42"
    made = post(url, "/generate", body)
    assert made.headers["x-request-id"] == made.json()["meta_info"]["id"]
    own = post(url, "/generate", {**body, "rid": "mine"}, headers={"X-Request-Id": "trace-43"})
    assert own.headers["x-request-id"] == own.json()["meta_info"]["id"] == "mine"
    bad = post(url, "/generate", body, headers={"X-Request-Id": "two words"})
    assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]
    chat = post(
        url,
        "/v1/completions",
        {"prompt": "t5 t6", "max_tokens": 1},
        headers={"X-Request-Id": "trace-44"},
    )
    assert chat.status_code == 200 and chat.headers["x-request-id"] == "trace-44"


def log_lines(runtime) -> list[str]:
    return Path(runtime.log_path).read_text().splitlines()


def test_every_process_logs_one_format_with_the_request_id(url, runtime):
    stream_then_abort(url, "log-me")
    line = "[server rid=log-me] POST /generate 200"
    assert wait_until(lambda: any(line in entry for entry in log_lines(runtime)), WAIT_S)
    lines = log_lines(runtime)
    assert not [entry for entry in lines if not LOG_LINE.match(entry)]
    matches = [LOG_LINE.match(entry) for entry in lines]
    assert {m.group(2) for m in matches} >= {"server", "scheduler"}
    assert any("Application startup complete" in entry for entry in lines)  # uvicorn's own
    done = next(entry for entry in lines if line in entry)
    assert "1 completion, 3 prompt (" in done and "finish abort" in done


def test_the_scheduler_logs_its_load_while_busy(url, runtime):
    def load_lines() -> list[str]:
        return [e for e in log_lines(runtime) if "[scheduler] load: 1 running, 0 waiting" in e]

    before = len(load_lines())
    body = {"input_ids": [5, 6, 7], "sampling_params": LONG, "stream": True, "rid": "busy"}
    with httpx.stream("POST", url + "/generate", json=body, timeout=WAIT_S) as r:
        events = sse_events(r.iter_lines())
        next(events)
        assert wait_until(lambda: len(load_lines()) > before, WAIT_S)
        post(url, "/abort_request", {"rid": "busy"})
        list(events)
    line = load_lines()[-1]
    assert re.search(r"KV \d+\.\d% \(\d+/32768 tokens\), cache hits \d+\.\d%, ", line)
    assert re.search(r"[\d.]+ prompt \+ [\d.]+ generation tokens/s", line)
