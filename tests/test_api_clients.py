"""What a client nobody on the project wrote meets first (issue 15), over real HTTP on loopback:
litellm's Ollama providers (no Content-Type), `/` as Ollama answers it, OpenAI's retrieve-model,
refusals of what the server cannot do (logprobs, images, embeddings), the cross-site rule that
replaces the JSON content-type requirement, and the access log."""
from __future__ import annotations

import base64
import logging
import os
import re

import httpx
import ollama
import openai
import pytest

from edge.api import ServingState
from robust_helpers import wait_for
from serving_helpers import LiveServer, api_settings, ndjson_lines, serving_engine

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches a price list at import otherwise
import litellm  # noqa: E402

MODEL_POSTS = [("/v1/sentiment", {"text": "what a lovely day"}),
               ("/v1/respond", {"text": "hello there", "max_tokens": 2}),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
               ("/api/chat", {"model": "qwen-edge", "stream": False, "options": {"num_predict": 2},
                              "messages": [{"role": "user", "content": "hi"}]}),
               ("/api/generate", {"model": "qwen-edge", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}),
               ("/api/show", {"model": "qwen-edge"})]
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
ACCESS_LINE = re.compile(r'^(?P<client>\S+) "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) (?P<secs>\d+\.\d\d)s'
                         r'(?P<usage>( \w+=\d+)*)$')


@pytest.fixture(scope="module")
def live(tiny_gguf):
    settings = api_settings(server={"allowed_hosts": ["nas.local"], "max_body_bytes": 4096})
    with serving_engine(tiny_gguf, settings) as server:
        yield server


@pytest.fixture(scope="module")
def http(live):
    with live.client() as client:
        yield client


# -- bodies without a JSON content type (litellm, Ollama's curl examples) --------------------------------

@pytest.mark.parametrize("provider", ["ollama", "ollama_chat"])
def test_litellm_ollama_providers(live, provider):
    reply = litellm.completion(model=f"{provider}/qwen-edge", api_base=live.url, max_tokens=3,
                               messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 3
    chunks = list(litellm.completion(model=f"{provider}/qwen-edge", api_base=live.url, max_tokens=3, stream=True,
                                     messages=[{"role": "user", "content": "hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path,body", MODEL_POSTS)
def test_json_bodies_are_read_whatever_the_content_type(http, path, body, content_type):
    import json
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.post(path, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 200, (path, content_type, r.text[:300])


@pytest.mark.parametrize("path", [p for p, _ in MODEL_POSTS])
def test_a_body_that_is_not_json_is_a_clear_400(http, path):
    for body in (b"text=hello", b"{'text': 'hi'}", b"hello"):
        r = http.post(path, content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 400, (path, body, r.status_code)
        error = r.json()["error"]
        assert "not valid JSON" in (error if isinstance(error, str) else error["message"])
    r = http.post(path, content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.text


# -- cross-site requests ------------------------------------------------------------------------------

def test_requests_from_other_sites_are_refused(live, http):
    own = {"Origin": live.url}
    for path, body in MODEL_POSTS[:1] + MODEL_POSTS[3:4]:
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://localhost:{live.port + 1}"},        # another port: another site
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
            r = http.post(path, json=body, headers={"Content-Type": "text/plain", **headers})
            assert r.status_code == 403, (path, headers, r.status_code)
            assert "refused" in r.text
        for headers in (own, {"Origin": "http://nas.local:8080"}, {"Sec-Fetch-Site": "same-origin"},
                        {"Sec-Fetch-Site": "none"}, {**own, "Sec-Fetch-Site": "same-origin"}):
            r = http.post(path, json=body, headers={"Content-Type": "text/plain", **headers})
            assert r.status_code == 200, (path, headers, r.text[:300])
    # reading is not refused: another site's page cannot read the answer anyway
    assert http.get("/api/tags", headers={"Origin": "http://evil.example"}).status_code == 200


# -- what Ollama's and OpenAI's clients probe ----------------------------------------------------------

def test_root_answers_like_ollama_and_serves_the_page_to_browsers(http):
    for method in ("GET", "HEAD"):
        r = http.request(method, "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), method
    assert http.get("/").text == "Ollama is running"
    for path in ("/api/version", "/api/tags"):   # Ollama answers HEAD on these too
        assert http.head(path).status_code == 200, path
    assert http.head("/").content == b""
    page = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html") and "<title>qwen-edge</title>" in page.text


def test_openai_retrieve_model(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    assert client.models.retrieve("qwen-edge").id == "qwen-edge"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.status_code == 404 and "gpt-4o" in err.value.message
    assert err.value.body["type"] == "model_not_found"


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"logprobs": True, "top_logprobs": 3}, {"top_logprobs": 2}])
def test_openai_logprobs_are_refused_not_dropped(live, extra):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen-edge", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
                                       **extra)
    assert "logprobs" in err.value.message and "not supported" in err.value.message
    done = client.chat.completions.create(model="qwen-edge", max_tokens=2, logprobs=False,
                                          messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content


def test_images_are_refused_on_both_apis(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen-edge", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}])
    assert "images are not supported" in err.value.message
    ollama_client = ollama.Client(host=live.url)
    with pytest.raises(ollama.ResponseError) as err:
        ollama_client.chat("qwen-edge", [{"role": "user", "content": "what is this?", "images": [PIXEL]}])
    assert err.value.status_code == 400 and "images are not supported" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        ollama_client.generate("qwen-edge", "what is this?", images=[PIXEL])
    assert err.value.status_code == 400 and "images are not supported" in err.value.error
    # an empty list is no image
    assert ollama_client.chat("qwen-edge", [{"role": "user", "content": "hi", "images": []}],
                              options={"num_predict": 2}).done


def test_unsupported_ollama_endpoints_say_what_is_not_supported(live, http):
    client = ollama.Client(host=live.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed("qwen-edge", "hello")
    assert err.value.status_code == 501 and err.value.error.startswith("embeddings are not supported")
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3")
    assert err.value.status_code == 501 and err.value.error.startswith("downloading models is not supported")
    r = http.post("/api/embeddings", json={"model": "qwen-edge", "prompt": "hi"})
    assert r.status_code == 501 and "convert" not in r.json()["error"]


# -- the access log -----------------------------------------------------------------------------------

def _access_lines(caplog) -> list[dict]:
    lines = []
    for record in caplog.records:
        if record.name == "edge.api.access":
            assert record.levelno == logging.INFO
            match = ACCESS_LINE.match(record.getMessage())
            assert match, record.getMessage()
            usage = dict(item.split("=") for item in match["usage"].split())
            lines.append({**match.groupdict(), "usage": {k: int(v) for k, v in usage.items()}})
    return lines


def _line_for(caplog, path: str, count: int = 1) -> list[dict]:
    found = wait_for(lambda: len([x for x in _access_lines(caplog) if x["path"] == path]) >= count and
                     [x for x in _access_lines(caplog) if x["path"] == path], 10, f"the access line of {path}")
    return found  # type: ignore[return-value]


def test_access_log_one_line_per_request_with_tokens_never_text(live, http, caplog):
    caplog.set_level(logging.INFO, logger="edge.api.access")
    secret = "zebra lullaby marmalade"
    with http.stream("POST", "/api/chat", json={"model": "qwen-edge", "options": {"num_predict": 5},
                                                "messages": [{"role": "user", "content": secret}]}) as r:
        final = ndjson_lines(r)[-1]
    [chat] = _line_for(caplog, "/api/chat")
    assert (chat["method"], chat["status"], chat["client"]) == ("POST", "200", "127.0.0.1")
    # the counts are only known once the stream has ended: the line was written then
    assert chat["usage"]["completion"] == final["eval_count"] == 5
    assert chat["usage"]["prompt"] == final["prompt_eval_count"] > 0
    http.post("/v1/respond", json={"text": secret, "max_tokens": 3})
    [respond] = _line_for(caplog, "/v1/respond")
    assert respond["usage"]["texts"] == 1 and respond["usage"]["text_tokens"] > 0
    assert respond["usage"]["completion"] == 3
    assert http.get("/api/version").status_code == 200
    assert _line_for(caplog, "/api/version")[0]["usage"] == {}
    # rejected requests log too
    assert http.post("/v1/sentiment", json={"text": secret}, headers={"Host": "evil.example"}).status_code == 403
    assert http.post("/v1/sentiment", json={"text": secret * 400}).status_code == 413
    assert http.post("/v1/sentiment", json={"text": secret}, headers={"Origin": "http://evil.example"}).status_code == 403
    statuses = [x["status"] for x in _line_for(caplog, "/v1/sentiment", 3)]
    assert statuses == ["403", "413", "403"]
    # a path is logged as sent: an encoded line break stays encoded
    assert http.get("/nothing%0d%0aFORGED").status_code == 404
    assert _line_for(caplog, "/nothing%0d%0aFORGED")[0]["status"] == "404"
    messages = [record.getMessage() for record in caplog.records if record.name == "edge.api.access"]
    assert not any("\n" in m or "\r" in m for m in messages)
    assert "zebra" not in "".join(messages) and "lullaby" not in "".join(messages)


def test_access_log_of_refusals_before_any_model_work(caplog):
    """401 (no key) and 503 (model still loading) need no model: an app whose engine is loading."""
    caplog.set_level(logging.INFO, logger="edge.api.access")
    server = LiveServer(ServingState(api_settings()), api_key="k3y").start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/v1/sentiment", json={"text": "hi"}).status_code == 401
            r = c.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"Authorization": "Bearer k3y"})
            assert r.status_code == 503
    finally:
        server.stop()
    assert [x["status"] for x in _line_for(caplog, "/v1/sentiment")] == ["401"]
    assert [x["status"] for x in _line_for(caplog, "/api/chat")] == ["503"]
