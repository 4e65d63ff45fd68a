"""Refusals over real HTTP: API key, Host check, size limits, bad input (never a 5xx), full queue
(503 + Retry-After), memory pressure, and a client that disconnects stopping its generation."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serving_helpers import api_settings, serving_engine

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def live(tiny_gguf):
    # one chat slot and a queue of one: the third concurrent chat is refused
    settings = api_settings(engine={"chat_slots": 1}, chat={"max_tokens": 1500, "temperature": 1.0},
                            server={"queue_size": 1, "max_body_bytes": 4096, "max_text_chars": 500,
                                    "allowed_hosts": ["nas.local"], "retry_after_s": 3})
    with serving_engine(tiny_gguf, settings, api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def http(live):
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_key_is_required_except_for_health(live):
    with live.client() as anonymous:
        r = anonymous.post("/v1/sentiment", json={"text": "hi"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"]
        assert anonymous.get("/api/tags").json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
        assert anonymous.get("/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 401


def test_key_is_accepted(http):
    assert http.post("/v1/sentiment", json={"text": "hi"}).status_code == 200


@pytest.mark.parametrize("host,status", [("evil.example.com", 403), ("evil.example.com:11434", 403),
                                         ("localhost:11434", 200), ("[::1]:80", 200), ("nas.local", 200),
                                         ("127.0.0.1", 200)])
def test_host_header_is_checked_on_a_loopback_bind(http, host, status):
    assert http.get("/api/version", headers={"Host": host}).status_code == status


@pytest.mark.parametrize("body", [
    {"text": ""}, {"text": "   "}, {"text": []}, {"text": 5}, {"text": ["ok", None]}, {"text": "hi", "language": "fr"},
    {"txt": "hi"}, [], "text",
])
def test_bad_sentiment_input_is_a_clear_4xx(http, body):
    r = http.post("/v1/sentiment", json=body)
    assert 400 <= r.status_code < 500, r.text
    message = r.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    ("/api/chat", {"model": "qwen-edge", "messages": [{"role": "user", "content": ""}]}),
    ("/api/chat", {"model": "qwen-edge", "messages": [{"role": "user", "content": "hi"}],
                   "options": {"temperature": "hot"}}),
    ("/v1/respond", {"text": "hi", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_bad_chat_input_is_a_clear_4xx(http, path, body):
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert "Traceback" not in r.text


def test_malformed_json_is_400_whatever_the_content_type(http):
    for content_type in ("application/json", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = http.post("/v1/sentiment", content=b'{"text": "unterminated', headers=headers)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], content_type
    r = http.post("/v1/sentiment", content=b'{"text": "hi"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["label"] in ("positive", "negative")


def test_size_limits(http):
    r = http.post("/v1/sentiment", json={"text": "x" * 501})
    assert r.status_code == 413 and "max_text_chars" in r.json()["error"]["message"]
    r = http.post("/v1/sentiment", content=json.dumps({"text": "x" * 5000}),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'
    r = http.post("/v1/sentiment", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def _open_stream(live, results: list, stop: threading.Event, seed: int) -> None:
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/api/chat", json={"model": "qwen-edge", "stream": True, "options": {"seed": seed},
                                                 "messages": [{"role": "user", "content": "tell me a story"}]}) as r:
            results.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return


def _busy(scheduler) -> bool:
    return scheduler.active_chats + scheduler.queue_depth >= 2


def test_full_queue_answers_503_with_retry_after_and_disconnect_stops_generation(live, http):
    scheduler = live.serving.scheduler
    stop = threading.Event()
    statuses: list[int] = []
    threads: list[threading.Thread] = []
    try:
        # one slot, a queue of one: two long replies fill both. A random-weight model may end a reply
        # early (on a quiet machine within milliseconds), even between our check and our request, so
        # streams are started three at a time, with different seeds, until a request finds both full.
        r = None
        for seed in range(0, 48, 3):
            for s in range(seed, seed + 3):
                threads.append(threading.Thread(target=_open_stream, args=(live, statuses, stop, s), daemon=True))
                threads[-1].start()
            deadline = time.monotonic() + 1.5
            while not _busy(scheduler) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _busy(scheduler):
                r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
                if r.status_code == 503:
                    break
                assert r.status_code == 200, r.text  # a reply ended in between: the request was served
        assert r is not None and r.status_code == 503, "never saw both the slot and the queue full"
        assert r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "overloaded"
    finally:
        stop.set()  # the clients hang up: their generations must stop long before 1500 tokens
        for t in threads:
            t.join(timeout=30)
    deadline = time.monotonic() + 20
    while scheduler.active_chats or scheduler.queue_depth:
        assert time.monotonic() < deadline, "generation went on after the clients left"
        time.sleep(0.05)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
    metrics = http.get("/metrics").text
    generated = float(next(line for line in metrics.splitlines()
                           if line.startswith("qwen_edge_generated_tokens_total")).split()[-1])
    assert generated < 2 * 1500


class _Refusing:
    accepting_work = False

    def snapshot(self) -> dict:
        return {"state": "hard", "rss_bytes": 1, "budget_bytes": 1}


def test_memory_pressure_refuses_new_work_and_degrades_health(live, http):
    live.serving.guard = _Refusing()
    try:
        r = http.post("/v1/sentiment", json={"text": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "memory_pressure" and r.headers["retry-after"]
        health = http.get("/health").json()
        assert health["status"] == "degraded" and health["memory"]["state"] == "hard"
        assert 'qwen_edge_memory_state{state="hard"} 1.0' in http.get("/metrics").text
    finally:
        live.serving.guard = None
    assert http.post("/v1/sentiment", json={"text": "hi"}).status_code == 200


def test_non_streaming_client_that_gives_up_stops_its_generation(live):
    scheduler = live.serving.scheduler
    with live.client(headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0) as impatient:
        for seed in range(2, 8):  # a random-weight model may end a reply early; find one still running at 1 s
            body = {"messages": [{"role": "user", "content": "tell me a long story"}], "seed": seed, "max_tokens": 1500}
            try:
                impatient.post("/v1/chat/completions", json=body)
            except httpx.ReadTimeout:
                break
        else:
            pytest.skip("every reply ended before the client gave up")
    assert scheduler.active_chats == 1  # still generating when the client left (1500 tokens take ~20 s)
    deadline = time.monotonic() + 5
    while scheduler.active_chats:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)
