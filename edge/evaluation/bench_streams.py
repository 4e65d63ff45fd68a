"""Several users at once (issue 16), measured on one running server for one turn.

* **Concurrency**: N streamed chat replies sent at the same instant, distinct prompts, greedy, a
  fixed ``max_tokens``. Aggregate tok/s is every stream's tokens over the wall time from the first
  request sent to the last token received; per-stream tok/s is a stream's tokens after its first
  over the time after its first (its decode speed); TTFT is request sent → first content token.
* **Mixed**: 2 chat streams reply back to back while one client sends short classification
  requests back to back, for a fixed window that opens once both chats have their first token.
  Chat aggregate tok/s counts the content tokens received inside the window.

Tokens are counted as the client sees them: one content event per token on both servers (our
daemon sends a piece per token; llama-server a token per event; a piece held back for an
incomplete UTF-8 character merges two), or the usage's ``completion_tokens`` of a whole reply
when it reports more.
"""
from __future__ import annotations

import logging
import threading
import time

import httpx

from edge.evaluation.http_servers import Server, StreamResult, classify_timed, stream_chat
from edge.evaluation.load import percentile

log = logging.getLogger(__name__)

# Distinct requests that a small model answers at length: programming tasks. Story requests are
# refused in a dozen tokens by the Qwen2.5-Coder stand-in, and a reply that ends early makes two
# servers' aggregate tok/s measure different work. A chat model writes code at length too.
TASKS = (
    "parses a CSV file into a list of dictionaries", "implements a binary search tree with insert and delete",
    "computes the Levenshtein distance between two strings", "implements an LRU cache",
    "merges overlapping intervals", "finds shortest paths with Dijkstra's algorithm",
    "converts Roman numerals to integers and back", "checks that brackets in a string are balanced",
    "implements quicksort and mergesort", "implements a trie for autocomplete",
    "computes a moving average over a stream of numbers", "tokenizes and evaluates arithmetic expressions",
    "renders a list of rows as a Markdown table", "schedules tasks by priority with a heap",
    "validates and normalizes phone numbers", "implements a simple rate limiter",
)
REQUEST = ("Write a Python module that {task}, with docstrings, comments and tests, "
           "then explain step by step how it works.")
# The short texts the mixed load classifies. English: the peer is given our English sentiment
# prompt, and English texts keep our daemon on that same prompt.
SHORT_TEXTS = (
    "I love this little box, it just works.", "The update broke everything and support never answered.",
    "Honestly the best purchase I made this year!", "My cat is sick and I feel terrible today.",
    "The battery died after two days.", "What a wonderful surprise, thank you!",
    "The food was cold and the waiter was rude.", "Setup took five minutes and it runs great.",
)
FIRST_TOKEN_WAIT_S = 120.0


def chat_messages(system: str, index: int) -> list[dict]:
    """The ``index``-th distinct chat request: our chat system prompt and one programming task."""
    task = TASKS[index % len(TASKS)]
    lap = f" (variant {index // len(TASKS) + 1})" if index >= len(TASKS) else ""
    return [{"role": "system", "content": system}, {"role": "user", "content": REQUEST.format(task=task) + lap}]


def _run_together(server: Server, requests: list[list[dict]], max_tokens: int) -> list[StreamResult]:
    """All ``requests`` streamed at once, one thread and connection each, released by one barrier."""
    results: list[StreamResult | BaseException | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def one(i: int) -> None:
        try:
            with server.client() as client:
                barrier.wait(60)
                results[i] = stream_chat(client, server, requests[i], max_tokens, stream=i)
        except BaseException as exc:  # re-raised below, in the caller's thread
            results[i] = exc
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    for r in results:
        if not isinstance(r, StreamResult):
            raise RuntimeError(f"a chat stream on {server.name} failed: {r!r}")
    return results  # type: ignore[return-value]


def warm_up_streams(server: Server, system: str, streams: int) -> None:
    """Short replies on as many streams, with prompts the measurement does not use: first allocations,
    the chat system prompt cached in every slot, nothing of the measured prompts."""
    _run_together(server, [chat_messages(system, len(TASKS) - 1 - i) for i in range(streams)], 8)


def concurrency_turn(server: Server, system: str, streams: int, max_tokens: int) -> dict:
    """One measurement of ``streams`` concurrent replies (see the module docstring)."""
    results = _run_together(server, [chat_messages(system, i) for i in range(streams)], max_tokens)
    start = min(r.sent for r in results)
    end = max(r.last or r.sent for r in results)
    tokens = sum(r.tokens for r in results)
    return {
        "streams": streams, "tokens": tokens, "tokens_per_stream": [r.tokens for r in results],
        "content_events": sum(r.chunks for r in results), "wall_s": round(end - start, 3),
        "aggregate_tps": round(tokens / (end - start), 2) if end > start else 0.0,
        "per_stream_tps": [round((r.chunks - 1) / (r.last - r.first), 2) if r.first and r.last and r.last > r.first
                           else 0.0 for r in results],
        "ttft_ms": [round((r.first - r.sent) * 1000, 1) if r.first else None for r in results],
    }


class BackgroundChats:
    """``n`` chat streams in threads, each replying to one distinct request after another, until the
    block ends. Entering waits (bounded) until every stream has had a token, so what follows
    measures running chats; the token times say how much chat got through in any interval."""

    def __init__(self, server: Server, system: str, n: int, max_tokens: int) -> None:
        self.server, self.system, self.n, self.max_tokens = server, system, n, max_tokens
        self.replies: list[StreamResult] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self) -> "BackgroundChats":
        for t in self._threads:
            t.start()
        end = time.monotonic() + FIRST_TOKEN_WAIT_S
        while time.monotonic() < end:
            with self._lock:
                if sum(1 for r in self.replies if r.first) >= self.n or self.errors:
                    return self
            time.sleep(0.05)
        log.warning("chat streams had no first token after %.0f s; measuring anyway", FIRST_TOKEN_WAIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()   # each stream stops reading and closes its connection: the server cancels it
        for t in self._threads:
            t.join(60)

    def _loop(self, stream: int) -> None:
        index = stream
        with self.server.client() as client:
            while not self._stop.is_set():
                result = StreamResult(sent=time.perf_counter())
                with self._lock:
                    self.replies.append(result)   # before it streams: __enter__ watches it fill
                try:
                    self._stream(client, index, stream, result)
                except Exception as exc:  # recorded, not fatal: the figures show how much chat got through
                    with self._lock:
                        self.errors.append(f"chat: {exc!r}"[:200])
                    return
                index += self.n

    def _stream(self, client: httpx.Client, index: int, stream: int, result: StreamResult) -> None:
        for attempt in range(2):
            try:
                stream_chat(client, self.server, chat_messages(self.system, index), self.max_tokens, self._stop,
                            stream=stream, into=result)
                return
            except httpx.RemoteProtocolError:  # a keep-alive connection the server closed after a reply
                if attempt or result.chunks:
                    raise

    def tokens_between(self, t0: float, t1: float) -> int:
        with self._lock:
            return sum(1 for r in self.replies for t in list(r.chunk_times) if t0 <= t <= t1)


def classify_until(server: Server, texts: list[str], deadline: float) -> tuple[list[float], list[str]]:
    """One client, one request after another until ``deadline`` (perf_counter); (latencies ms, errors)."""
    latencies: list[float] = []
    with server.client() as client:
        while time.perf_counter() < deadline:
            try:
                _, ms = classify_timed(server, client, texts[len(latencies) % len(texts)])
            except Exception as exc:  # reported with the figures: a failing server is a finding too
                return latencies, [f"classify: {exc!r}"[:200]]
            latencies.append(ms)
    return latencies, []


def mixed_turn(server: Server, system: str, texts: list[str], window_s: float, chat_streams: int = 2,
               max_tokens: int = 128) -> dict:
    """``chat_streams`` replies back to back while one client classifies ``texts`` back to back."""
    with BackgroundChats(server, system, chat_streams, max_tokens) as chats:
        t0 = time.perf_counter()
        latencies, errors = classify_until(server, texts, t0 + window_s)
        t1 = time.perf_counter()
    in_window = chats.tokens_between(t0, t1)
    return {"window_s": round(t1 - t0, 2), "chat_streams": chat_streams, "chat_tokens": in_window,
            "chat_aggregate_tps": round(in_window / (t1 - t0), 2), "classifications": len(latencies),
            "classify_p50_ms": percentile(latencies, 50), "classify_p90_ms": percentile(latencies, 90),
            "errors": chats.errors + errors}
