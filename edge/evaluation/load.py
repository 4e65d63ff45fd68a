"""Load test of a running daemon over HTTP: N concurrent clients mixing sentiment, Ollama streaming
chat and OpenAI chat for a fixed time (or request count), with every answer checked for completeness.

Each client sends one request at a time, always of the same kind: the clients are shared out by the
mix weights (8 clients, mix 2:1:1 = 4 sentiment, 2 Ollama stream, 2 OpenAI clients). An answer counts
as *answered* only when it is complete: a sentiment result with a known label, an Ollama stream whose
last line says ``"done": true``, an OpenAI completion with a finish reason. A 503 is *rejected* (the
daemon shedding load, by design); anything else (another status, a dropped connection, a stream
without its final event) is *failed*. The daemon's resident memory is sampled throughout (psutil on its pid).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import psutil

log = logging.getLogger(__name__)

SENTIMENT_LABELS = frozenset({"positive", "negative", "neutral"})
TEXTS = (
    "I love this little box, it just works.", "The update broke everything and support never answered.",
    "It arrived on time.", "这个产品非常好用，我很喜欢。", "服务太差了，等了两个小时。",
    "Honestly the best purchase I made this year!", "Meh. It is fine I guess.",
    "My cat is sick and I feel terrible today.",
)
ENDPOINTS = ("sentiment", "ollama_chat", "openai_chat")
DEFAULT_MIX = {"sentiment": 2, "ollama_chat": 1, "openai_chat": 1}


class IncompleteAnswer(RuntimeError):
    """The daemon accepted the request but did not deliver a whole answer."""


@dataclass(frozen=True)
class LoadOptions:
    url: str = "http://127.0.0.1:11434"
    clients: int = 8
    duration_s: float = 30.0
    max_requests: int | None = None        # stop after this many requests (all clients), if sooner
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_tokens: int = 32                   # reply length of each chat request
    api_key: str | None = None
    pid: int | None = None                 # the daemon's pid (found from the port when None)
    timeout_s: float = 300.0               # per request
    backoff_s: float = 0.25                # pause after a 503 (the daemon asks for Retry-After)
    sample_interval_s: float = 0.1         # RSS sampling
    idle_sentiment: int = 8                # sentiment requests timed one by one before the load starts
    model: str = "qwen-edge"
    seed: int = 0


@dataclass
class EndpointStats:
    sent: int = 0
    answered: int = 0
    rejected_503: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    first_byte_ms: list[float] = field(default_factory=list, repr=False)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "rejected_503": self.rejected_503,
                "failed": self.failed, "p50_ms": percentile(self.latencies_ms, 50),
                "p99_ms": percentile(self.latencies_ms, 99), "max_ms": max(self.latencies_ms, default=None),
                "first_token_p50_ms": percentile(self.first_byte_ms, 50),
                "first_token_p99_ms": percentile(self.first_byte_ms, 99), "errors": dict(self.errors)}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the value below which q % of the samples fall), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 1)


# -- one request of each kind: returns first-token time (ms) or None; raises on an incomplete answer --
async def _sentiment(client: httpx.AsyncClient, opts: LoadOptions, rng: random.Random) -> float | None:
    r = await client.post("/v1/sentiment", json={"text": rng.choice(TEXTS)})
    _check_status(r)
    label = r.json().get("label")
    if label not in SENTIMENT_LABELS:
        raise IncompleteAnswer(f"sentiment answered {label!r}")
    return None


async def _ollama_chat(client: httpx.AsyncClient, opts: LoadOptions, rng: random.Random) -> float | None:
    body = {"model": opts.model, "stream": True, "options": {"num_predict": opts.max_tokens},
            "messages": [{"role": "user", "content": rng.choice(TEXTS)}]}
    t0 = time.perf_counter()
    first = None
    last: dict = {}
    async with client.stream("POST", "/api/chat", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            _check_status(r)
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            last = json.loads(line)
            if "error" in last:
                raise IncompleteAnswer(f"stream error: {last['error']}")
            if first is None:
                first = (time.perf_counter() - t0) * 1000
    if not last.get("done"):
        raise IncompleteAnswer("stream ended without its final done event")
    return first


async def _openai_chat(client: httpx.AsyncClient, opts: LoadOptions, rng: random.Random) -> float | None:
    body = {"model": opts.model, "max_tokens": opts.max_tokens,
            "messages": [{"role": "user", "content": rng.choice(TEXTS)}]}
    r = await client.post("/v1/chat/completions", json=body)
    _check_status(r)
    choice = (r.json().get("choices") or [{}])[0]
    if not isinstance(choice.get("message", {}).get("content"), str) or not choice.get("finish_reason"):
        raise IncompleteAnswer("completion without content or finish_reason")
    return None


REQUESTS: dict[str, Callable[[httpx.AsyncClient, LoadOptions, random.Random], Awaitable[float | None]]] = {
    "sentiment": _sentiment, "ollama_chat": _ollama_chat, "openai_chat": _openai_chat,
}


class Rejected(RuntimeError):
    """503: the daemon refused the request (queue full, memory pressure)."""


def _check_status(r: httpx.Response) -> None:
    if r.status_code == 503:
        raise Rejected()
    if r.status_code != 200:
        raise IncompleteAnswer(f"HTTP {r.status_code}: {r.text[:200]}")


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class _Run:
    opts: LoadOptions
    stats: dict[str, EndpointStats]
    deadline: float
    budget_left: int | None
    peak_rss: int = 0

    def take_ticket(self) -> bool:
        if time.monotonic() >= self.deadline:
            return False
        if self.budget_left is not None:
            if self.budget_left <= 0:
                return False
            self.budget_left -= 1
        return True


def _schedule(mix: dict[str, int]) -> list[str]:
    unknown = set(mix) - set(REQUESTS)
    if unknown or not any(v > 0 for v in mix.values()):
        raise ValueError(f"mix must weigh some of {', '.join(ENDPOINTS)} (got {mix})")
    return [name for name in ENDPOINTS for _ in range(mix.get(name, 0))]


async def _client(run: _Run, http: httpx.AsyncClient, index: int, schedule: list[str]) -> None:
    rng = random.Random(run.opts.seed * 7919 + index)
    # Each client sends one kind only (clients are shared out by the mix weights), so the chat load
    # stays constant and a sentiment client never waits for a reply of its own.
    kind = schedule[index % len(schedule)]
    while run.take_ticket():
        s = run.stats[kind]
        s.sent += 1
        t0 = time.perf_counter()
        try:
            first = await REQUESTS[kind](http, run.opts, rng)
        except Rejected:
            s.rejected_503 += 1
            await asyncio.sleep(run.opts.backoff_s)
            continue
        except (IncompleteAnswer, httpx.HTTPError, ValueError) as exc:
            s.failed += 1
            reason = f"{type(exc).__name__}: {exc}"[:160]
            s.errors[reason] = s.errors.get(reason, 0) + 1
            continue
        s.answered += 1
        s.latencies_ms.append((time.perf_counter() - t0) * 1000)
        if first is not None:
            s.first_byte_ms.append(first)


async def _sample_rss(run: _Run, proc: psutil.Process | None, stop: asyncio.Event) -> None:
    while proc is not None:
        try:
            run.peak_rss = max(run.peak_rss, proc.memory_info().rss)
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), run.opts.sample_interval_s)
            return
        except asyncio.TimeoutError:
            pass


def daemon_pid(url: str) -> int | None:
    """The pid listening on the URL's port on this machine, if it can be seen."""
    port = httpx.URL(url).port or 80
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        return None
    return None


async def _health(http: httpx.AsyncClient) -> dict:
    r = await http.get("/health")
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else {}


async def run_load_async(opts: LoadOptions) -> dict:
    schedule = _schedule(opts.mix)
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    limits = httpx.Limits(max_connections=opts.clients + 4, max_keepalive_connections=opts.clients + 4)
    pid = opts.pid or daemon_pid(opts.url)
    proc = psutil.Process(pid) if pid else None
    async with httpx.AsyncClient(base_url=opts.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(opts.timeout_s, connect=30)) as http:
        health = await _health(http)
        if health.get("status") not in ("ready", "degraded"):
            raise RuntimeError(f"the daemon at {opts.url} is not ready: {health.get('status') or 'no /health'}")
        idle = await _idle_sentiment(http, opts)
        run = _Run(opts, {k: EndpointStats() for k in ENDPOINTS}, time.monotonic() + opts.duration_s,
                   opts.max_requests)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(run, proc, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(run, http, i, schedule) for i in range(opts.clients)))
        elapsed = time.perf_counter() - t0
        stop.set()
        await sampler
        after = await _health(http)
    return _report(opts, run, elapsed, pid, health, after, idle)


async def _idle_sentiment(http: httpx.AsyncClient, opts: LoadOptions) -> list[float]:
    """Sentiment latency with nothing else running: the reference for "under chat load"."""
    if opts.idle_sentiment <= 0:
        return []
    rng = random.Random(opts.seed)
    await _sentiment(http, opts, rng)  # warm-up: the first request evaluates the cached instruction prefix
    latencies = []
    for _ in range(opts.idle_sentiment):
        t0 = time.perf_counter()
        await _sentiment(http, opts, rng)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _report(opts: LoadOptions, run: _Run, elapsed: float, pid: int | None, before: dict, after: dict,
            idle: list[float]) -> dict:
    per = {k: s.summary() for k, s in run.stats.items() if s.sent}
    totals = {key: sum(s[key] for s in per.values()) for key in ("sent", "answered", "rejected_503", "failed")}
    budget = (after.get("memory") or {}).get("budget_bytes") or (before.get("memory") or {}).get("budget_bytes")
    peak_guard = (after.get("memory") or {}).get("peak_rss_bytes")
    peak = max(run.peak_rss, peak_guard or 0) or None
    return {
        "url": opts.url, "clients": opts.clients, "duration_s": round(elapsed, 1), "mix": opts.mix,
        "max_tokens": opts.max_tokens, "daemon_pid": pid, "model": (before.get("model") or {}).get("name"),
        **totals, "requests_per_s": round(totals["answered"] / elapsed, 2) if elapsed else None,
        "endpoints": per,
        "idle_sentiment_p50_ms": percentile(idle, 50), "idle_sentiment_p99_ms": percentile(idle, 99),
        "all_accepted_complete": totals["failed"] == 0,
        "peak_rss_mb": round(peak / 2**20, 1) if peak else None,
        "budget_mb": round(budget / 2**20, 1) if budget else None,
        "rss_within_budget": (peak <= budget) if peak and budget else None,
        "daemon_status_after": after.get("status"),
    }


def run_load(opts: LoadOptions) -> dict:
    """Run the load test (blocking) and return its report (see ``_report`` for the fields)."""
    return asyncio.run(run_load_async(opts))


def report_failures(report: dict, sentiment_p99_bound_ms: float | None = None) -> list[str]:
    """Why a report is not a pass: failed requests, RSS over budget, sentiment p99 over its bound."""
    problems = []
    if report["failed"]:
        problems.append(f"{report['failed']} requests failed")
    if report["answered"] == 0:
        problems.append("no request was answered")
    if report.get("rss_within_budget") is False:
        problems.append(f"peak RSS {report['peak_rss_mb']} MB is over the budget of {report['budget_mb']} MB")
    p99 = (report["endpoints"].get("sentiment") or {}).get("p99_ms")
    if sentiment_p99_bound_ms is not None and p99 is not None and p99 > sentiment_p99_bound_ms:
        problems.append(f"sentiment p99 {p99:.0f} ms is over the bound of {sentiment_p99_bound_ms:.0f} ms")
    return problems
