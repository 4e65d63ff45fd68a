"""Prometheus metrics of one app: request counts and latencies per endpoint, tokens, live gauges.

Each app owns its registry (tests build several apps in one process). Gauges that describe the
present (queue depth, memory) are read at scrape time by a collector instead of being pushed.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.api.access import log_request
from edge.api.serving import ServingState
from edge.engine.engine import SENTIMENT
from edge.engine.task_runner import TaskResult
from edge.engine.types import ChatStats

disable_created_metrics()  # the *_created series only add noise to a small daemon's scrape
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# snapshot() key of the memory guard -> (metric name, help)
MEMORY_GAUGES: dict[str, tuple[str, str]] = {
    "rss_bytes": ("qwen_edge_memory_rss_bytes", "Resident set size of the daemon"),
    "uss_bytes": ("qwen_edge_memory_uss_bytes", "Unique set size of the daemon"),
    "pss_bytes": ("qwen_edge_memory_pss_bytes", "Proportional set size of the daemon"),
    "peak_rss_bytes": ("qwen_edge_memory_peak_rss_bytes", "Highest RSS sampled"),
    "budget_bytes": ("qwen_edge_memory_budget_bytes", "Memory budget (setting or cgroup limit)"),
    "soft_limit_bytes": ("qwen_edge_memory_soft_limit_bytes", "Above this, idle sessions are dropped"),
    "hard_limit_bytes": ("qwen_edge_memory_hard_limit_bytes", "Above this, new work is refused"),
    "system_available_bytes": ("qwen_edge_system_available_bytes", "Memory available to the whole system"),
}
MEMORY_STATES = ("ok", "soft", "hard")


class _LiveCollector:
    def __init__(self, serving: ServingState) -> None:
        self.serving = serving

    def describe(self) -> list[Metric]:
        return []  # values are read at scrape time only

    def collect(self) -> Iterator[Metric]:
        s = self.serving
        ready = GaugeMetricFamily("qwen_edge_ready", "1 when the model is loaded and serving")
        ready.add_metric([], 1.0 if s.status == "ready" else 0.0)
        yield ready
        sched = s.scheduler
        for name, value, doc in (
                ("qwen_edge_queue_depth", sched.queue_depth if sched else 0, "Requests waiting"),
                ("qwen_edge_queue_size", s.settings.server.queue_size, "Queue bound (503 beyond)"),
                ("qwen_edge_active_chats", sched.active_chats if sched else 0, "Replies being generated")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        snap = memory_snapshot(s)
        for key, (name, doc) in MEMORY_GAUGES.items():
            if snap.get(key) is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(snap[key]))
                yield g
        state = GaugeMetricFamily("qwen_edge_memory_state", "1 for the current memory state", labels=["state"])
        for name in MEMORY_STATES:
            state.add_metric([name], 1.0 if snap.get("state") == name else 0.0)
        yield state


def memory_snapshot(serving: ServingState) -> dict:
    """The guard's snapshot, or a bare RSS reading when the app runs without a guard (tests)."""
    if serving.guard is not None:
        return serving.guard.snapshot()
    import psutil
    return {"state": "ok", "rss_bytes": psutil.Process().memory_info().rss, "budget_bytes": None}


class ApiMetrics:
    def __init__(self, serving: ServingState) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen_edge_http_requests", "HTTP requests", ["endpoint", "method", "status"],
                                registry=r)
        self.latency = Histogram("qwen_edge_http_request_duration_seconds", "Time to the last byte of the response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwen_edge_prompt_tokens", "Chat prompt tokens", registry=r)
        self.cached_tokens = Counter("qwen_edge_prompt_cached_tokens", "Chat prompt tokens found in the KV cache",
                                     registry=r)
        self.generated_tokens = Counter("qwen_edge_generated_tokens", "Chat tokens generated", registry=r)
        self.task_results = Counter("qwen_edge_task_results", "Texts answered per task (label tasks: per label; "
                                    "JSON tasks: label 'json')", ["task", "label"], registry=r)
        self.task_latency = Histogram("qwen_edge_task_seconds", "Time per text, per task", ["task"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        # the sentiment task's own series, as before tasks were files (dashboards read them)
        self.sentiment = Counter("qwen_edge_sentiment_results", "Texts classified", ["label"], registry=r)
        self.sentiment_latency = Histogram("qwen_edge_sentiment_seconds", "Model time per classified text",
                                           buckets=LATENCY_BUCKETS, registry=r)
        r.register(_LiveCollector(serving))

    def record_chat(self, stats: ChatStats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.completion_tokens)

    def record_task(self, task: str, results: Iterable[TaskResult]) -> None:
        for r in results:
            self.task_results.labels(task, r.label or "json").inc()
            self.task_latency.labels(task).observe(r.latency_ms / 1000)
            if task == SENTIMENT:
                self.sentiment.labels(r.label).inc()
                self.sentiment_latency.observe(r.latency_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response, times it to its last byte (streams included) and writes its access-log line."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.setdefault("state", {})   # the routes note token counts here for the access log
        status = {"code": 500}
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # bounded label set
            self.metrics.requests.labels(endpoint, scope["method"], str(status["code"])).inc()
            seconds = time.perf_counter() - t0
            self.metrics.latency.labels(endpoint).observe(seconds)
            log_request(scope, status["code"], seconds)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, counting_send)
        finally:
            record()
