"""Prometheus metrics for GET /metrics.

Latency histograms are observed here, in the server, as requests finish. Scheduler state
(running / waiting requests, KV usage, cache hit rate, token counters) is read from the
scheduler's ServerInfo at scrape time, so the numbers are the scheduler's own and nothing
has to be pushed on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def tokens_in_use(info: ServerInfo) -> int:
    """KV slots held by requests: neither free nor reclaimable from the prefix cache."""
    return info.max_total_tokens - info.available_tokens - info.evictable_tokens


class SchedulerCollector(Collector):
    """Turns the last ServerInfo read from the scheduler into metric families."""

    def __init__(self) -> None:
        self.info: ServerInfo | None = None
        self.alive = True

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.info)

    def _families(self, info: ServerInfo | None) -> Iterator[Metric]:
        yield _gauge("loom_scheduler_up", "1 while the scheduler process serves", int(self.alive))
        if info is None:
            return
        used = tokens_in_use(info)
        yield _gauge("loom_num_running_requests", "requests decoding", info.running_requests)
        yield _gauge("loom_num_waiting_requests", "requests queued", info.waiting_requests)
        yield _gauge("loom_max_total_tokens", "KV pool capacity in tokens", info.max_total_tokens)
        yield _gauge("loom_kv_tokens_in_use", "KV tokens held by requests", used)
        yield _gauge(
            "loom_kv_usage",
            "share of the KV pool held by requests",
            _ratio(used, info.max_total_tokens),
        )
        yield _gauge("loom_cache_tokens", "KV tokens held by the prefix cache", info.cache_tokens)
        hit_rate = _ratio(info.cache_hit_tokens, info.prompt_tokens_total)
        yield _gauge(
            "loom_cache_hit_rate", "share of prompt tokens served from the cache", hit_rate
        )
        yield _counter("loom_prompt_tokens", "prompt tokens received", info.prompt_tokens_total)
        yield _counter("loom_generation_tokens", "tokens generated", info.generation_tokens_total)
        yield _counter(
            "loom_cache_hit_tokens", "prompt tokens found in the cache", info.cache_hit_tokens
        )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.scheduler = SchedulerCollector()
        self.registry.register(self.scheduler)
        self.ttft = Histogram(
            "loom_time_to_first_token_seconds",
            "time to first token of streamed requests",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "loom_inter_token_latency_seconds",
            "mean time between output tokens, one sample per streamed request",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "loom_e2e_request_latency_seconds",
            "time from arrival to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "loom_requests", "finished requests", ["finish_reason"], registry=self.registry
        )

    def observe(self, meta: dict, streamed: bool) -> None:
        """One finished completion. A non-streamed request's first token reaches the server
        with its last, so only streamed requests say anything about TTFT and ITL."""
        self.finished.labels((meta.get("finish_reason") or {}).get("type", "unknown")).inc()
        self.e2e.observe(meta["e2e_latency"])
        ttft = meta.get("ttft")
        if not streamed or ttft is None:
            return
        self.ttft.observe(ttft)
        tokens = meta.get("completion_tokens", 0)
        if tokens > 1:
            self.itl.observe((meta["e2e_latency"] - ttft) / (tokens - 1))

    def render(self, info: ServerInfo | None, alive: bool) -> bytes:
        self.scheduler.info = info
        self.scheduler.alive = alive
        return generate_latest(self.registry)


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
