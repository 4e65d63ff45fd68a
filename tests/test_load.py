"""The load tool (`qwen-edge bench load`, edge.evaluation.load) against the real daemon on the tiny
model, and against a deliberately broken server to show it counts what it must."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import uvicorn
from click.testing import CliRunner

from edge.cli.bench_load import bench_load
from edge.evaluation.load import LoadOptions, percentile, report_failures, run_load
from robust_helpers import Daemon
from serving_helpers import free_port


@pytest.fixture(scope="module")
def daemon(tiny_gguf, tmp_path_factory):
    d = Daemon(tiny_gguf, tmp_path_factory.mktemp("load_daemon"), free_port()).start()
    yield d
    d.stop()


def test_short_mixed_load_on_the_tiny_model(daemon):
    report = run_load(LoadOptions(url=daemon.url, clients=8, duration_s=4, max_tokens=8, pid=daemon.pid))
    assert report_failures(report) == [], json.dumps(report, indent=1)
    assert report["failed"] == 0 and report["all_accepted_complete"]
    for name in ("sentiment", "ollama_chat", "openai_chat"):
        assert report["endpoints"][name]["answered"] > 0, report["endpoints"]
    assert report["endpoints"]["ollama_chat"]["first_token_p50_ms"] is not None
    assert report["rss_within_budget"] is True and 20 < report["peak_rss_mb"] < 1024
    assert report["daemon_status_after"] == "ready"


def test_sentiment_does_not_queue_behind_whole_chat_replies(daemon):
    """With chat streams running all the time, a sentiment request shares steps with the replies
    (tests/test_engine_batching.py checks the policy step by step); it never waits for whole
    replies, so a typical one takes well under half a typical reply."""
    report = run_load(LoadOptions(url=daemon.url, clients=6, duration_s=5, max_tokens=48, pid=daemon.pid,
                                  mix={"sentiment": 1, "ollama_chat": 2}))
    assert report["failed"] == 0, report
    sentiment, chat = report["endpoints"]["sentiment"], report["endpoints"]["ollama_chat"]
    assert sentiment["answered"] >= 5 and chat["answered"] >= 2, report["endpoints"]
    assert sentiment["p50_ms"] < 0.5 * chat["p50_ms"], report["endpoints"]


def test_cli_json_report_and_request_count(daemon):
    result = CliRunner().invoke(bench_load, ["--url", daemon.url, "--clients", "3", "--requests", "6",
                                             "--duration", "60", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sent"] == 6 and report["answered"] == 6 and report["duration_s"] < 60


def test_cli_refuses_a_bad_mix_and_a_dead_url():
    runner = CliRunner()
    assert runner.invoke(bench_load, ["--mix", "sentiment=x"]).exit_code == 2
    result = runner.invoke(bench_load, ["--url", f"http://127.0.0.1:{free_port()}", "--duration", "1"])
    assert result.exit_code == 1 and "cannot load-test" in result.output


# -- the tool's own honesty: a server that cuts streams and sheds load ------------------------------
async def _broken_app(scope, receive, send):
    """/health ready; sentiment answers 503 every other time; /api/chat streams but never says done;
    OpenAI chat answers 500."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    _broken_app.calls = getattr(_broken_app, "calls", 0) + 1
    if path == "/health":
        status, body = 200, {"status": "ready", "memory": {"budget_bytes": 1 << 30}}
    elif path == "/v1/sentiment":
        status, body = (503, {"error": "busy"}) if _broken_app.calls % 2 else (200, {"label": "positive"})
    elif path == "/api/chat":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        await send({"type": "http.response.body", "body": b'{"message": {"content": "hi"}, "done": false}\n',
                    "more_body": True})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    else:
        status, body = 500, {"error": "boom"}
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def test_incomplete_streams_and_errors_count_as_failed_and_503_as_rejected():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_broken_app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        report = run_load(LoadOptions(url=f"http://127.0.0.1:{port}", clients=4, duration_s=1.0, backoff_s=0.01,
                                      idle_sentiment=0, pid=None))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    ep = report["endpoints"]
    assert ep["ollama_chat"]["failed"] == ep["ollama_chat"]["sent"] > 0
    assert any("without its final done event" in reason for reason in ep["ollama_chat"]["errors"])
    assert ep["openai_chat"]["failed"] == ep["openai_chat"]["sent"] > 0
    assert ep["sentiment"]["rejected_503"] > 0 and ep["sentiment"]["failed"] == 0
    assert not report["all_accepted_complete"] and "requests failed" in report_failures(report)[0]


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([7.0], 99) == 7.0
