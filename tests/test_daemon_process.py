"""`qwen-edge serve` as a real process: notify protocol, SIGHUP reload, SIGTERM drain (exit 0),
and the start-up refusals (memory budget, non-loopback bind without key, offline without a model)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving_helpers import PROMPTS, free_port

CONFIG = """\
[model]
n_ctx = 4096
n_batch = 256
n_threads = 2

[prompts]
dir = "{prompts}"
max_text_tokens = 96

[chat]
max_tokens = 8
temperature = 0.0

[server]
model_name = "{name}"
"""


def _serve(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QWEN_EDGE_", "NOTIFY_", "WATCHDOG_", "STATE_DIRECTORY", "CACHE_DIRECTORY"))}
    env.update({"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), **env_extra})
    return subprocess.Popen([sys.executable, "-c", "from edge.cli import main; main()", "serve", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _refusal(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    proc = _serve(args, env_extra, tmp_path)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _next_message(sock: socket.socket, prefix: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        if msg.startswith(prefix) or f"\n{prefix}" in msg:
            return msg
    raise AssertionError(f"no {prefix} notification within {timeout} s")


def test_notify_reload_and_sigterm_drain(tiny_gguf, tmp_path):
    config = tmp_path / "qwen-edge.toml"
    config.write_text(CONFIG.format(prompts=PROMPTS, name="qwen-edge"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    port = free_port()
    proc = _serve(["--model", str(tiny_gguf), "--port", str(port), "--config", str(config)],
                  {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}, tmp_path)
    try:
        ready = _next_message(notify, "READY=1", 60)
        assert f"MAINPID={proc.pid}" in ready and "STATUS=serving" in ready
        _next_message(notify, "WATCHDOG=1", 3)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").json()["status"] == "ready"

        # SIGHUP: the config file is read again (model_name is applied at once)
        config.write_text(CONFIG.format(prompts=PROMPTS, name="kitchen-bot"))
        proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 15
        while httpx.get(url + "/v1/models").json()["data"][0]["id"] != "kitchen-bot":
            assert time.monotonic() < end, "SIGHUP did not reload the configuration"
            time.sleep(0.1)

        # SIGTERM while a reply streams: the reply completes, then the process exits 0
        body = {"text": "tell me a long story", "stream": True, "max_tokens": 150, "temperature": 1.0, "seed": 2}
        with httpx.stream("POST", url + "/v1/respond", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["type"] == "sentiment"
            assert json.loads(next(lines))["type"] == "delta"
            proc.send_signal(signal.SIGTERM)
            _next_message(notify, "STOPPING=1", 5)
            events = [json.loads(line) for line in lines if line.strip()]
        assert events[-1]["type"] == "done", events[-1]
        # generation went on after SIGTERM and the reply ended normally (seed 2: 150 tokens, no end token)
        assert events[-1]["finish_reason"] in ("length", "stop") and events[-1]["usage"]["completion_tokens"] > 2
        assert sum(e["type"] == "delta" for e in events) >= 2
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_over_the_memory_budget_is_refused_before_loading(tiny_gguf, tmp_path):
    code, err = _refusal(["--model", str(tiny_gguf), "--port", str(free_port())],
                         {"QWEN_EDGE_MEMORY__BUDGET_MB": "64"}, tmp_path)
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert "budget 64 MiB" in last and "F32" in last and "Traceback" not in err


def test_non_loopback_bind_without_key_is_refused(tiny_gguf, tmp_path):
    code, err = _refusal(["--model", str(tiny_gguf), "--host", "0.0.0.0", "--port", str(free_port())], {}, tmp_path)
    assert code != 0 and "without an API key" in err and "Traceback" not in err


def test_offline_without_a_model_says_how_to_point_at_one(tmp_path):
    code, err = _refusal(["--port", str(free_port())],
                         {"QWEN_EDGE_MODEL__DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
                          "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    lines = [line for line in err.strip().splitlines() if "qwen-edge" in line or "Error" in line]
    assert code != 0 and "Traceback" not in err
    assert "--model FILE.gguf" in lines[-1] and "HF_FOLDER" in lines[-1]


def test_missing_model_file_is_one_line(tmp_path):
    code, err = _refusal(["--model", str(tmp_path / "nope.gguf")], {}, tmp_path)
    assert code != 0 and err.strip().splitlines()[-1].endswith("(give a .gguf file or a Hugging Face model folder)")
