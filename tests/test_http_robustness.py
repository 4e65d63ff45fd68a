"""HTTP robustness (issue 5): every endpoint fuzzed from the daemon's own OpenAPI document
(schemathesis), hostile bodies, no filesystem access from request values (inotify canary), and the
daemon process itself: SIGKILL under load then restart, a client vanishing mid-stream, key and
Host checks on real binds.

What must hold for any request: a 2xx or a 4xx with a one-line message, never a 5xx, and the daemon
still answering afterwards.
"""
from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

from edge.api import ServingState, create_app
from robust_helpers import Daemon, wait_for
from serving_helpers import api_settings, free_port, serving_engine

POST_ENDPOINTS = ("/v1/sentiment", "/v1/respond", "/v1/chat/completions", "/api/chat", "/api/generate", "/api/show")
# the OpenAPI document needs no model: an app whose engine is still "loading" serves the same one
SCHEMA = schemathesis.openapi.from_dict(create_app(ServingState(api_settings())).openapi())
SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], allow_x00=True)
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "num_predict")


@pytest.fixture(scope="module")
def live(tiny_gguf):
    settings = api_settings(server={"request_timeout_s": 30, "queue_size": 64}, chat={"max_tokens": 8})
    with serving_engine(tiny_gguf, settings) as server:
        yield server


@pytest.fixture(scope="module")
def http(live):
    with live.client() as client:
        yield client


def assert_clear_refusal_or_success(response, what: str = "", allowed_5xx: tuple[int, ...] = ()) -> None:
    status = response.status_code
    assert status < 500 or status in allowed_5xx, f"{what}: {status} {response.text[:500]}"
    if status >= 400:
        body = response.json()
        message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
        assert message and "\n" not in message and "Traceback" not in message, (what, message)


def assert_alive(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ready"
    r = http.post("/v1/sentiment", json={"text": "still alive?"})
    assert r.status_code == 200 and r.json()["label"] in ("positive", "negative")


def _short_replies(value: object) -> None:
    """Valid but huge reply lengths would only make the tiny model talk for minutes: cap them,
    everything else the fuzzer sends goes through unchanged."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in LENGTH_FIELDS and isinstance(item, int) and not isinstance(item, bool) and item > 8:
                value[key] = 8
            else:
                _short_replies(item)
    elif isinstance(value, list):
        for item in value:
            _short_replies(item)


# -- fuzzing from the OpenAPI document ----------------------------------------------------------------
@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzz_every_endpoint_never_5xx(case, live, http):
    _fuzz_once(case, live, http)


# Pulling any model but the served one is refused by design with 501 Not Implemented.
REFUSED_BY_DESIGN = {"/api/pull": (501,)}


def _fuzz_once(case, live, http) -> None:
    _short_replies(case.body)
    response = case.call(base_url=live.url, timeout=60)
    assert_clear_refusal_or_success(response, f"{case.method} {case.path} {str(case.body)[:300]}",
                                    allowed_5xx=REFUSED_BY_DESIGN.get(case.path, ()))
    assert http.get("/health").status_code == 200


def test_fuzzed_daemon_still_serves(http):
    assert_alive(http)


# -- hostile bodies -----------------------------------------------------------------------------------
NOT_AN_OBJECT = [b"", b"{", b'{"text": "a",}', b"\xff\xfe\x00", b"null", b"[]", b'"text"', b"123", b"true",
                 b'{"text": "\\ud800"', b"{" * 5000, b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                 b'{"messages": [' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"]}"]
ODD_OBJECTS = [b'{"text": NaN}', b'{"messages": {"role": "user"}}', b'{"text": Infinity, "model": -Infinity}']


@pytest.mark.parametrize("path", POST_ENDPOINTS)
def test_malformed_json_is_a_clear_4xx(http, path):
    for body in NOT_AN_OBJECT:  # broken syntax, too deep to parse, or not a JSON object
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body[:40], r.status_code, r.text[:300])
        assert_clear_refusal_or_success(r, f"{path} {body[:40]!r}")
    for body in ODD_OBJECTS:  # Ollama accepts unknown fields (a request without messages loads the model)
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_clear_refusal_or_success(r, f"{path} {body[:40]!r}")
    assert_alive(http)


CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "application/json; charset=latin-1", "application/octet-stream"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_wrong_content_types(http, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in POST_ENDPOINTS:
        body = "text=caf\xe9" if "form" in (content_type or "") else '{"text": "caf\xe9"}'
        r = http.post(path, content=body.encode("latin-1"), headers=headers)
        assert_clear_refusal_or_success(r, f"{path} {content_type}")


@pytest.mark.parametrize("path,body", [
    ("/v1/sentiment", {"text": {"nested": [1, 2, {"x": None}]}}),
    ("/v1/sentiment", {"text": ["ok"] * 257}),
    ("/v1/sentiment", {"text": "ok", "language": ["en"]}),
    ("/v1/respond", {"messages": "hi"}),
    ("/v1/respond", {"text": "hi", "max_tokens": "many"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}],
                              "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}),
    ("/api/chat", {"model": 7, "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/chat", {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/show", {"model": "\udc00x"}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"top_k": 10 ** 30}}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"seed": -(10 ** 30)}}),
    ("/api/generate", {"prompt": ["hi"]}),
])
def test_wrong_types_and_odd_values(http, path, body):
    r = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert_clear_refusal_or_success(r, f"{path} {body}")


def test_huge_bodies_are_413(http):
    big = json.dumps({"text": "x" * (2 << 20)}).encode()
    for path in POST_ENDPOINTS:
        r = http.post(path, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, (path, r.status_code)

    def chunks():
        yield b'{"text": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'
    r = http.post("/v1/sentiment", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_alive(http)


def test_thousands_of_turns_do_not_stall_the_engine(live, http):
    """A 1 MB history of tiny turns is trimmed quickly; other clients keep being served meanwhile."""
    history = [{"role": "user" if i % 2 else "assistant", "content": "hi"} for i in range(12_000)]
    history[-1] = {"role": "user", "content": "and now?"}
    result: dict = {}

    def chat() -> None:
        t0 = time.monotonic()
        with live.client() as c:
            result["r"] = c.post("/api/chat", json={"model": "qwen-edge", "stream": False, "messages": history,
                                                    "options": {"num_predict": 4}})
        result["s"] = time.monotonic() - t0
    thread = threading.Thread(target=chat)
    thread.start()
    t0 = time.monotonic()
    assert http.post("/v1/sentiment", json={"text": "am I served meanwhile?"}).status_code == 200
    assert time.monotonic() - t0 < 15
    thread.join(timeout=60)
    assert not thread.is_alive(), "a long history held the request for over a minute"
    assert result["r"].status_code == 200, result["r"].text[:300]
    assert result["s"] < 30, f"trimming the history took {result['s']:.1f} s"


# -- no filesystem access from request values ----------------------------------------------------------
IN_ALL_EVENTS = 0xFFF


class Inotify:
    """Every open, read, write, create, delete or rename under the watched paths (Linux)."""

    def __init__(self, *paths: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        for path in paths:
            if self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_ALL_EVENTS) < 0:
                pytest.skip(f"cannot watch {path}")

    def events(self) -> list[tuple[int, str]]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16: pos + 16 + length].rstrip(b"\0").decode(errors="replace")
                out.append((mask, name))
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def test_no_endpoint_touches_a_path_taken_from_the_request(http, tmp_path):
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "model.gguf"
    canary.write_bytes(b"GGUF canary")
    new = canary_dir / "created"
    names = [str(canary), f"../../../..{canary}", f"file://{canary}", str(canary_dir), str(new)]
    watch = Inotify(canary_dir, canary)
    try:
        assert watch.events() == []
        for name in names:
            requests = [
                ("POST", "/api/pull", {"name": name, "model": name, "insecure": True, "stream": False}),
                ("POST", "/api/push", {"name": name, "model": name}),
                ("POST", "/api/create", {"model": str(new), "name": str(new), "modelfile": f"FROM {name}",
                                         "from": name, "files": {"model.gguf": name}, "path": name}),
                ("DELETE", "/api/delete", {"name": name, "model": name}),
                ("POST", "/api/copy", {"source": name, "destination": str(new)}),
                ("POST", "/api/show", {"model": name, "name": name}),
                ("POST", "/api/embed", {"model": name, "input": "x"}),
                ("POST", "/api/embeddings", {"model": name, "prompt": "x"}),
                ("POST", "/api/blobs/sha256:" + "0" * 64, None),
                ("POST", "/api/chat", {"model": name, "messages": [{"role": "user", "content": "hi"}],
                                       "images": [name], "stream": False}),
                ("POST", "/api/generate", {"model": name, "prompt": "hi", "images": [name], "stream": False,
                                           "options": {"num_predict": 2}}),
                ("POST", "/v1/chat/completions", {"model": name, "max_tokens": 2, "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{name}"}}]}]}),
                ("GET", f"/static/..%2f..%2f..%2f..{canary}", None),
                ("GET", f"/{name}", None),
            ]
            for method, path, body in requests:
                content = json.dumps(body).encode() if body is not None else str(canary).encode()
                r = http.request(method, path, content=content, headers={"Content-Type": "application/json"})
                # model management is refused by design with 501 Not Implemented
                assert_clear_refusal_or_success(r, f"{method} {path} {name}", allowed_5xx=(501,))
        assert watch.events() == [], "a request value reached the filesystem"
        assert sorted(p.name for p in canary_dir.iterdir()) == ["model.gguf"]
        assert canary.read_bytes() == b"GGUF canary"
        # the counter-check: the watch does see an access when one happens
        canary.read_bytes()
        assert watch.events()
    finally:
        watch.close()


# -- the daemon process ---------------------------------------------------------------------------------
def _stream_until_cut(url: str, results: list, stop: threading.Event) -> None:
    """Stream replies one after another until one is cut; record how that one ended. A reply the
    tiny model ends on its own (it can sample an end token early) is followed by the next, so
    chats keep running until the kill however short the replies come out."""
    body = {"model": "qwen-edge", "stream": True, "options": {"num_predict": 400, "temperature": 1.0},
            "messages": [{"role": "user", "content": "tell me a long story"}]}
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=5)) as c:
            while True:
                with c.stream("POST", "/api/chat", json=body) as r:
                    last = None
                    for line in r.iter_lines():
                        if line.strip():
                            last = json.loads(line)
                        if stop.is_set():
                            results.append(("client left", time.monotonic()))
                            return
                if not (last and last.get("done")):
                    results.append(("cut", time.monotonic()))
                    return
    except httpx.HTTPError as exc:
        results.append((type(exc).__name__, time.monotonic()))


def test_daemon_killed_under_load_restarts_ready(tiny_gguf, tmp_path):
    port = free_port()
    daemon = Daemon(tiny_gguf, tmp_path, port).start()
    results: list = []
    stop = threading.Event()
    clients = [threading.Thread(target=_stream_until_cut, args=(daemon.url, results, stop)) for _ in range(4)]
    try:
        for t in clients:
            t.start()
        wait_for(lambda: (daemon.health() or {}).get("queue", {}).get("active_chats", 0) >= 2, 30, "chats running")
        killed_at = time.monotonic()
        os.killpg(daemon.pid, 9)
        daemon.proc.wait(timeout=30)
        assert daemon.proc.returncode == -9
        for t in clients:
            t.join(timeout=30)
            assert not t.is_alive(), "a client hung on a killed daemon"
        assert len(results) == 4
        # every client's last stream, open at the kill, saw the cut (or its next request was
        # refused); none pretended to finish or went on after the kill
        assert all(outcome != "client left" and ended >= killed_at for outcome, ended in results), results
        t0 = time.monotonic()
        daemon.start(wait=True, timeout=90)  # same port, same config
        restart_s = time.monotonic() - t0
        with httpx.Client(base_url=daemon.url, timeout=60) as c:
            assert_alive(c)
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
        assert restart_s < 60
    finally:
        stop.set()
        daemon.stop()


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


def test_client_leaving_mid_stream_stops_its_generation(tiny_gguf, tmp_path):
    daemon = Daemon(tiny_gguf, tmp_path, free_port(), chat={"max_tokens": 400, "temperature": 1.0}).start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=60) as c:
            with c.stream("POST", "/api/chat", json={"model": "qwen-edge", "stream": True, "options": {
                    "num_predict": 400, "temperature": 1.0},
                    "messages": [{"role": "user", "content": "a very long story please"}]}) as r:
                lines = 0
                for line in r.iter_lines():
                    lines += bool(line.strip())
                    if lines >= 3:
                        break  # the client hangs up after three pieces
            # the other clients are served, and the abandoned reply stops
            r2 = c.post("/api/chat", json={"model": "qwen-edge", "stream": False, "options": {"num_predict": 6},
                                           "messages": [{"role": "user", "content": "hello"}]})
            assert r2.status_code == 200 and r2.json()["done"] is True
            wait_for(lambda: _metric(c.get("/metrics").text, "qwen_edge_active_chats") == 0, 20,
                     "the abandoned generation to stop")
            generated = _metric(c.get("/metrics").text, "qwen_edge_generated_tokens_total")
            assert generated < 400, f"{generated} tokens: the abandoned reply ran to its end"
            time.sleep(1.0)
            assert _metric(c.get("/metrics").text, "qwen_edge_generated_tokens_total") == generated
            assert_alive(c)
    finally:
        daemon.stop()


def _outward_address() -> str | None:
    """This machine's non-loopback address, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_key_and_host_checks_on_real_binds(tiny_gguf, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y-for-tests\n")
    public = Daemon(tiny_gguf, tmp_path, free_port(),
                    server={"host": "0.0.0.0", "api_key_file": str(key_file)}).start(wait=False)
    try:
        address = _outward_address() or "127.0.0.1"
        url = f"http://{address}:{public.port}"
        wait_for(lambda: (public.health() or {}).get("status") == "ready", 90, "the public daemon")
        with httpx.Client(base_url=url, timeout=60) as c:
            for method, path in (("POST", "/v1/sentiment"), ("GET", "/api/tags"), ("POST", "/api/chat"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("POST", "/api/pull")):
                r = c.request(method, path, json={"text": "hi"})
                assert r.status_code == 401, (path, r.status_code)
            assert c.post("/v1/sentiment", json={"text": "hi"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.post("/v1/sentiment", json={"text": "hi"},
                          headers={"Authorization": "Bearer k3y-for-tests"}).status_code == 200
            assert c.get("/health").status_code == 200
    finally:
        public.stop()
    local = Daemon(tiny_gguf, tmp_path, free_port()).start(wait=False)
    try:
        wait_for(lambda: (local.health() or {}).get("status") == "ready", 90, "the loopback daemon")
        with httpx.Client(base_url=local.url, timeout=60) as c:
            for host in ("attacker.example", "attacker.example:11434", "127.0.0.1.nip.io", "localhost.evil.com"):
                r = c.post("/v1/sentiment", json={"text": "hi"}, headers={"Host": host})
                assert r.status_code == 403 and "not allowed" in r.json()["error"]["message"], host
            assert c.post("/v1/sentiment", json={"text": "hi"}, headers={"Host": f"localhost:{local.port}"}).status_code == 200
    finally:
        local.stop()


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzz_every_endpoint_longer(case, live, http):
    _fuzz_once(case, live, http)
