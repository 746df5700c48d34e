"""Prometheus metrics for GET /metrics, under the names existing dashboards read.

Two families, every series labelled `model_name` (the served model name):
- `vllm:*`: vLLM's names and meanings, which vLLM's Grafana dashboards, autoscalers (KEDA)
  and gateways (the Gateway API inference extension reads vllm:num_requests_waiting and
  vllm:kv_cache_usage_perc) already understand. Where vLLM renamed a series, both names
  are given (gpu_cache_usage_perc / kv_cache_usage_perc, time_per_output_token_seconds /
  inter_token_latency_seconds), so older and newer dashboards both work.
- `loom:*`: what vLLM has no name for (the prefix cache's size, jump-forward, aborts by
  who aborted, HTTP errors, whether the scheduler is up).
The old `loom_*` names are gone rather than kept beside these: one number under two names
doubles the series and lets two dashboards disagree about which one they read.

No `_created` series (prometheus_client's extra per-counter timestamps, which no
dashboard reads and which double a scrape's size).

Latency histograms are observed here, in the server, as requests finish. Scheduler state
(running / waiting requests, KV usage, cache and token counters) is read from the
scheduler's ServerInfo at scrape time, so nothing is pushed on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loom.runtime.messages import ServerInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(21))  # 1 .. 1M tokens

# Process-wide in prometheus_client; this process serves one registry, ours.
prometheus_client.disable_created_metrics()


class SchedulerCollector(Collector):
    """Turns the last ServerInfo read from the scheduler into metric families."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.info: ServerInfo | None = None
        self.alive = True

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.info)

    def _families(self, info: ServerInfo | None) -> Iterator[Metric]:
        yield self._gauge("loom:scheduler_up", "1 while the scheduler serves", int(self.alive))
        if info is None:
            return
        usage = _ratio(info.tokens_in_use, info.max_total_tokens)
        yield self._gauge("vllm:num_requests_running", "requests running", info.running_requests)
        yield self._gauge("vllm:num_requests_waiting", "requests queued", info.waiting_requests)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV pool share in use (0-1)", usage)
        yield self._gauge("vllm:gpu_cache_usage_perc", "the same; vLLM's older name", usage)
        yield self._counter("vllm:prompt_tokens", "prompt tokens", info.prompt_tokens_total)
        yield self._counter(
            "vllm:generation_tokens", "generated tokens", info.generation_tokens_total
        )
        yield self._counter(
            "vllm:num_preemptions", "requests retracted to free KV", info.retractions_total
        )
        yield self._counter(
            "vllm:prefix_cache_queries", "prompt tokens looked up", info.prompt_tokens_total
        )
        yield self._counter(
            "vllm:prefix_cache_hits", "prompt tokens found cached", info.cache_hit_tokens
        )
        yield self._gauge("loom:max_total_tokens", "KV pool capacity", info.max_total_tokens)
        yield self._gauge("loom:kv_tokens_in_use", "KV tokens held by requests", info.tokens_in_use)
        yield self._gauge(
            "loom:cache_tokens", "KV tokens the prefix cache holds", info.cache_tokens
        )
        hit_rate = _ratio(info.cache_hit_tokens, info.prompt_tokens_total)
        yield self._gauge("loom:cache_hit_rate", "share of prompt tokens cached", hit_rate)
        yield self._counter(
            "loom:evicted_tokens", "tokens evicted from the prefix cache", info.evicted_tokens_total
        )
        yield self._counter("loom:forward_steps", "model forwards run", info.forward_steps_total)
        yield self._counter(
            "loom:jump_forward_tokens",
            "grammar-forced tokens the model confirmed",
            info.jump_forward_tokens_total,
        )

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.scheduler = SchedulerCollector(model_name)
        self.registry.register(self.scheduler)
        self.ttft = self._histogram(
            "vllm:time_to_first_token_seconds", "time to first token", _LATENCY_BUCKETS
        )
        # One sample per streamed request: its mean time between output tokens, under
        # vLLM's older and newer names.
        self.tpot = self._histogram(
            "vllm:time_per_output_token_seconds", "mean time per output token", _ITL_BUCKETS
        )
        self.itl = self._histogram(
            "vllm:inter_token_latency_seconds", "mean time between output tokens", _ITL_BUCKETS
        )
        self.e2e = self._histogram(
            "vllm:e2e_request_latency_seconds", "arrival to last token", _LATENCY_BUCKETS
        )
        self.queue = self._histogram(
            "vllm:request_queue_time_seconds", "arrival to first prefill", _LATENCY_BUCKETS
        )
        # The phases of a request after its wait (inference = prefill + decode); prefill
        # and decode need the first token's time, so come from streamed requests only.
        self.inference = self._histogram(
            "vllm:request_inference_time_seconds", "first prefill to last token", _LATENCY_BUCKETS
        )
        self.prefill = self._histogram(
            "vllm:request_prefill_time_seconds", "first prefill to first token", _LATENCY_BUCKETS
        )
        self.decode = self._histogram(
            "vllm:request_decode_time_seconds", "first token to last token", _LATENCY_BUCKETS
        )
        self.prompt_tokens = self._histogram(
            "vllm:request_prompt_tokens", "prompt tokens per request", _TOKEN_BUCKETS
        )
        self.generation_tokens = self._histogram(
            "vllm:request_generation_tokens", "generated tokens per request", _TOKEN_BUCKETS
        )
        self.finished = Counter(
            "vllm:request_success",
            "finished requests by finish reason (stop, length, abort)",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.aborted = Counter(
            "loom:aborted_requests",
            "requests aborted, by who: client (disconnect, /abort_request) or server",
            ["model_name", "by"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "loom:http_errors",
            "HTTP responses with an error status, by status",
            ["model_name", "status"],
            registry=self.registry,
        )

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        family = Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)
        return family.labels(self.model_name)

    def observe(self, meta: dict, streamed: bool, client_aborted: bool) -> None:
        """One finished completion. A non-streamed request's first token reaches the server
        with its last, so only streamed requests say anything about TTFT and ITL."""
        reason = (meta.get("finish_reason") or {}).get("type", "unknown")
        self.finished.labels(self.model_name, reason).inc()
        if reason == "abort":
            self.abort("client" if client_aborted else "server")
        self.e2e.observe(meta["e2e_latency"])
        self.prompt_tokens.observe(meta.get("prompt_tokens", 0))
        tokens = meta.get("completion_tokens", 0)
        self.generation_tokens.observe(tokens)
        queue = meta.get("queue_time")
        if queue is not None:
            self.queue.observe(queue)
            self.inference.observe(max(meta["e2e_latency"] - queue, 0.0))
        ttft = meta.get("ttft")
        if not streamed or ttft is None:
            return
        self.ttft.observe(ttft)
        self.decode.observe(meta["e2e_latency"] - ttft)
        if queue is not None:
            self.prefill.observe(max(ttft - queue, 0.0))
        if tokens > 1:
            per_token = (meta["e2e_latency"] - ttft) / (tokens - 1)
            self.tpot.observe(per_token)
            self.itl.observe(per_token)

    def abort(self, by: str) -> None:
        self.aborted.labels(self.model_name, by).inc()

    def http_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self, info: ServerInfo | None, alive: bool) -> bytes:
        self.scheduler.info = info
        self.scheduler.alive = alive
        return generate_latest(self.registry)


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0
