"""The three protocols over real HTTP on loopback, with the real `ollama` and `openai` clients."""
from __future__ import annotations

import time

import ollama
import openai
import pytest

from serving_helpers import api_settings, ndjson_lines, serving_engine, sse_events

TOOLS = [{"type": "function", "function": {"name": "HassTurnOn", "description": "Turn on a device",
                                            "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                                                           "required": ["name"]}}}]


@pytest.fixture(scope="module")
def live(tiny_gguf):
    with serving_engine(tiny_gguf, api_settings()) as server:
        yield server


@pytest.fixture(scope="module")
def http(live):
    with live.client() as client:
        yield client


# -- Ollama (Home Assistant's client) ------------------------------------------------------------

def test_ollama_client_lists_shows_and_reports_the_model(live):
    client = ollama.Client(host=live.url)
    models = client.list().models
    assert [m.model for m in models] == ["qwen-edge:latest"]
    assert models[0].details.format == "gguf" and models[0].details.family == "qwen2"
    assert models[0].size > 0 and models[0].digest
    shown = client.show("qwen-edge")
    assert "completion" in shown.capabilities and shown.details.quantization_level == "F32"
    running = client.ps().models
    assert running[0].model == "qwen-edge:latest" and running[0].context_length == 4096


def test_ollama_chat_with_tools_format_num_ctx_and_keep_alive(live):
    client = ollama.Client(host=live.url)
    reply = client.chat("qwen-edge:latest", [{"role": "system", "content": "You are a home assistant."},
                                             {"role": "user", "content": "turn on the kitchen light"}],
                        tools=TOOLS, format="json", keep_alive="5m", options={"num_ctx": 32768, "num_predict": 5})
    assert reply.done and reply.message.role == "assistant"
    assert reply.eval_count == 5 and reply.done_reason == "length"
    assert isinstance(reply.message.content, str) and reply.message.content


def test_ollama_chat_streams_ndjson_chunks(live):
    client = ollama.Client(host=live.url)
    chunks = list(client.chat("qwen-edge", [{"role": "user", "content": "hello"}], stream=True,
                              options={"num_predict": 6}))
    assert len(chunks) >= 2 and all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert chunks[-1].eval_count == 6 and chunks[-1].prompt_eval_count > 0
    assert "".join(c.message.content for c in chunks[:-1])


def test_ollama_generate_and_load_request(live):
    client = ollama.Client(host=live.url)
    out = client.generate("qwen-edge", "Say hi", options={"num_predict": 4})
    assert out.done and out.response and out.eval_count == 4
    loaded = client.generate("qwen-edge", "")  # Ollama's "load the model" request
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_unknown_model_and_management_endpoints(live, tmp_path, http):
    client = ollama.Client(host=live.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat("llama3", [{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "qwen-edge:latest" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3")
    assert err.value.status_code == 501 and "not supported" in err.value.error
    # the served model, with or without its tag, is "already here", as Ollama answers (HA pulls it)
    assert client.pull("qwen-edge").status == "success"
    assert [p.status for p in client.pull("qwen-edge:latest", stream=True)] == ["success"]
    for method, path in [("POST", "/api/create"), ("POST", "/api/push"), ("DELETE", "/api/delete"),
                         ("POST", "/api/copy")]:
        r = http.request(method, path, json={"model": str(tmp_path / "x"), "source": "a", "destination": "b"})
        assert r.status_code == 501 and set(r.json()) == {"error"}, path
    assert list(tmp_path.iterdir()) == []
    assert http.get("/api/version").json()["version"]


# -- OpenAI --------------------------------------------------------------------------------------

def test_openai_client_chat_completion(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["qwen-edge"]
    done = client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                          messages=[{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 5


def test_openai_client_streams_sse(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="qwen-edge", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4


def test_sse_framing_ends_with_done(http):
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "stream": True, "max_tokens": 3}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


# -- native --------------------------------------------------------------------------------------

def test_sentiment_one_text_and_a_list(http):
    one = http.post("/v1/sentiment", json={"text": "I loved every minute of it"}).json()
    assert one["label"] in ("positive", "negative") and 0 <= one["probability"] <= 1
    many = http.post("/v1/sentiment", json={"text": ["great", "awful", "这家店很好"], "language": None}).json()
    assert [r["language"] for r in many["results"]] == ["en", "en", "zh"]


def test_respond_streams_sentiment_first_then_reply(http):
    with http.stream("POST", "/v1/respond", json={"text": "I am so happy today", "stream": True,
                                                  "max_tokens": 5}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = ndjson_lines(r)
    assert events[0]["type"] == "sentiment" and events[0]["sentiment"]["label"] in ("positive", "negative")
    assert {e["type"] for e in events[1:-1]} == {"delta"}
    assert events[-1]["type"] == "done" and 0 < events[-1]["usage"]["completion_tokens"] <= 5


def test_respond_without_stream(http):
    body = http.post("/v1/respond", json={"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"},
                                                       {"role": "user", "content": "this is terrible"}],
                                          "max_tokens": 3}).json()
    assert body["sentiment"]["label"] in ("positive", "negative") and body["reply"]
    assert 0 < body["usage"]["completion_tokens"] <= 3


# -- health and metrics --------------------------------------------------------------------------

def test_health_and_metrics(http):
    health = http.get("/health").json()
    assert health["status"] == "ready" and health["model"]["file_type"] == "f32"
    assert health["memory"]["rss_bytes"] > 0
    http.post("/v1/sentiment", json={"text": "fine"})
    text = http.get("/metrics").text
    assert 'qwen_edge_http_requests_total{endpoint="/v1/sentiment",method="POST",status="200"}' in text
    assert 'qwen_edge_http_request_duration_seconds_bucket{endpoint="/v1/sentiment"' in text
    for name in ("qwen_edge_generated_tokens_total", "qwen_edge_prompt_tokens_total", "qwen_edge_queue_depth",
                 "qwen_edge_memory_rss_bytes", "qwen_edge_sentiment_results_total"):
        assert name in text, name
    generated = [line for line in text.splitlines() if line.startswith("qwen_edge_generated_tokens_total")]
    assert float(generated[0].split()[-1]) > 0  # the chats above were counted


def test_memory_guard_soft_limit_drops_idle_sessions_on_the_worker(live, http):
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "remember me"}], "max_tokens": 2})
    engine = live.serving.engine
    assert any(slot.tokens for slot in engine.chat.slots)
    live.serving.request_shed()  # what MemoryGuard calls when RSS crosses the soft limit
    deadline = time.monotonic() + 5
    while any(slot.tokens for slot in engine.chat.slots):
        assert time.monotonic() < deadline, "idle sessions were not dropped"
        time.sleep(0.05)
