"""`qwen-edge bench http` against a live server over loopback (tiny model, a few texts); the
side-by-side path against a stand-in llama-server (tests/fake_llama_server.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from edge.cli.bench_http import bench_http
from edge.evaluation.http_servers import PeerSpec, peer_command, sentiment_prompt
from serving_helpers import PROMPTS, api_settings, serving_engine

FAKE_PEER = Path(__file__).resolve().parent / "fake_llama_server.py"


@pytest.fixture(scope="module")
def live(tiny_gguf):
    with serving_engine(tiny_gguf, api_settings(chat={"max_tokens": 300})) as server:
        yield server


@pytest.fixture
def fake_peer(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """An executable standing in for llama-server, and the file it logs its command lines to."""
    exe, log = tmp_path / "llama-server", tmp_path / "peer.log"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_PEER} \"$@\"\n")
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_PEER_LOG", str(log))
    return exe, log


def _texts(tmp_path: Path, n: int = 8) -> Path:
    texts = tmp_path / "texts.tsv"
    texts.write_text("text\tlabel\n" + "".join(f"sample text {i} is lovely\tpositive\n" for i in range(n)))
    return texts


def test_bench_http_measures_a_running_daemon(live, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_http, ["--url", live.url, "--texts", str(_texts(tmp_path)), "--limit", "8",
                                             "--rounds", "2", "--chat-tokens", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["results"][0]
    assert row["server"] == "qwen-edge" and row["texts"] == 8
    assert 0 < row["p50_ms"] <= row["p90_ms"] and row["decode_tps"] > 0 and row["rss_peak_mb"] > 0
    assert "p50_ms" in result.output


def test_concurrency_and_mixed_modes_on_a_running_daemon(live, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_http, ["--url", live.url, "--concurrency", "1,2", "--mixed", "--window", "2",
                                             "--chat-tokens", "12", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [row["streams"] for row in report["concurrency"]] == [1, 2]
    two = report["concurrency"][1]["servers"]["qwen-edge"]
    assert two["aggregate_tps"]["median"] > 0 and two["per_stream_tps_median"] > 0
    assert 0 < two["ttft_p50_ms"] <= two["ttft_p90_ms"] and 0 < two["tokens_per_stream"] <= 12
    turn = next(t for t in report["turns"] if t["phase"] == "concurrency" and t["streams"] == 2)
    assert len(turn["ttft_ms"]) == len(turn["per_stream_tps"]) == 2 and turn["tokens"] >= 2
    mixed = report["mixed"]["servers"]["qwen-edge"]
    assert mixed["classifications"]["median"] >= 1 and mixed["chat_aggregate_tps"]["median"] > 0
    assert mixed["classify_p50_ms"]["median"] <= mixed["classify_p90_ms"]["median"] and mixed["errors"] == 0
    assert "2 concurrent stream(s)" in result.output and "mixed:" in result.output


def test_side_by_side_with_a_peer(live, tmp_path, fake_peer):
    exe, log = fake_peer
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_http, ["--url", live.url, "--peer-server", str(exe), "--concurrency", "2",
                                             "--mixed", "--window", "1", "--repeat", "2", "--chat-tokens", "8",
                                             "--threads", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    row = report["concurrency"][0]
    assert row["servers"]["llama-server"]["tokens_per_stream"] == 8
    assert len(row["ratio_ours_over_peer"]["aggregate_tps"]["per_repetition"]) == 2
    assert report["mixed"]["servers"]["llama-server"]["classifications"]["median"] >= 1
    assert report["mixed"]["ratio_ours_over_peer"]["chat_aggregate_tps"]["median"] > 0
    # turns alternate: ours-peer, then peer-ours, in each phase
    order = [(t["phase"], t["server"]) for t in report["turns"]]
    assert order[:4] == [("concurrency", "qwen-edge"), ("concurrency", "llama-server"),
                         ("concurrency", "llama-server"), ("concurrency", "qwen-edge")]
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(commands) == 4   # one start per turn of the peer
    concurrency_cmd, kv = " ".join(commands[0]), report["served"]["kv_cache_type"]
    for flag in ("-np 2", f"-c {2 * report['served']['n_ctx']}", "-t 2", "--cont-batching", "-fa on",
                 f"-ctk {kv}", f"-ctv {kv}"):
        assert flag in concurrency_cmd, (flag, concurrency_cmd)
    assert "-np 3" in " ".join(commands[2]) and "--no-kv-unified" in commands[2]


def test_with_a_model_each_server_runs_alone(tiny_gguf, tmp_path, fake_peer, monkeypatch):
    monkeypatch.setenv("QWEN_EDGE_MODEL__N_CTX", "4096")   # the tiny model's byte-level tokens: long prompts
    monkeypatch.setenv("QWEN_EDGE_PROMPTS__MAX_TEXT_TOKENS", "96")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_http, ["--model", str(tiny_gguf), "--peer-server", str(fake_peer[0]),
                                             "--concurrency", "1", "--chat-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ours, peer = json.loads(out.read_text())["turns"]
    assert ours["server"] == "qwen-edge" and "serve" in ours["command"] and peer["server"] == "llama-server"
    # the daemon the harness started for its turn was stopped before the peer's turn began
    assert not psutil.pid_exists(ours["pid"]) or psutil.Process(ours["pid"]).status() == psutil.STATUS_ZOMBIE


def test_nothing_to_measure_is_a_usage_error():
    result = CliRunner().invoke(bench_http, ["--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--concurrency" in result.output


def test_peer_command_is_issue_16s():
    spec = PeerSpec(Path("/x/llama-server"), Path("/m.gguf"), 2048, 2, "f16", PROMPTS)
    cmd = " ".join(peer_command(spec, 8080, 4, sentiment_slot=False))
    for flag in ("-np 4", "-c 8192", "-t 2", "--cont-batching", "-fa on", "-ctk f16", "-ctv f16"):
        assert flag in cmd
    assert "--no-kv-unified" not in cmd


def test_peer_prompt_is_our_few_shot_prompt_in_chatml():
    head, tail, labels, grammar = sentiment_prompt(PROMPTS)
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_start|>user\n")
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    assert labels == {"Positive": "positive", "Negative": "negative"} and "Positive" in grammar
