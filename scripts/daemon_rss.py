"""The daemon's memory at its largest ordinary load: every task's prefix cached, one conversation
filling the whole chat context (engine.prefix_tokens decides how long that is), a request to every
task; then /health's memory (RSS now and at its peak). Prints one JSON object.

    .venv/bin/python scripts/daemon_rss.py MODEL.gguf [--kv-cache-type auto|f16|q8_0]

The daemon is started and stopped here (`qwen-edge serve --model MODEL` on a free loopback port).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TASK_TEXT = {"sentiment": "这家餐厅的服务太差了。", "emotion": "I finally passed my driving test!",
             "spam": "Congratulations! You won a prize, click here.", "extract": "明天下午五点提醒我取快递"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the daemon exited with {proc.returncode}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("the daemon did not become ready")


def long_conversation(client: httpx.Client, reply_tokens: int) -> dict:
    """One conversation as long as the chat context allows: the daemon's own error says how much."""
    budget = client.get("/health").json()["model"].get("n_ctx", 2048)
    words = budget
    while words > 16:
        body = {"model": "any", "max_tokens": reply_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": "word " * words}]}
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            return {"prompt_tokens": r.json()["usage"]["prompt_tokens"], "reply_tokens": reply_tokens}
        words = int(words * 0.9)
    sys.exit("no conversation fitted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--kv-cache-type", default="auto", choices=["auto", "f16", "q8_0"])
    parser.add_argument("--reply-tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "QWEN_EDGE_MODEL__KV_CACHE_TYPE": args.kv_cache_type}
    proc = subprocess.Popen([str(ROOT / ".venv/bin/qwen-edge"), "serve", "--model", str(args.model),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as client:
            wait_ready(client, proc)
            chat = long_conversation(client, args.reply_tokens)
            for task, text in TASK_TEXT.items():
                client.post(f"/v1/tasks/{task}", json={"text": text}).raise_for_status()
            time.sleep(3)  # the memory guard samples every memory.sample_interval_s (2 s)
            health = client.get("/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
    memory = health["memory"]
    print(json.dumps({"model": args.model.name, "kv_cache_type": health["model"].get("kv_cache_type"),
                      "n_ctx": health["model"].get("n_ctx"), "chat": chat,
                      "rss_mb": round(memory["rss_bytes"] / 2**20),
                      "peak_rss_mb": round(memory["peak_rss_bytes"] / 2**20),
                      "budget_mb": round(memory["budget_bytes"] / 2**20)}))


if __name__ == "__main__":
    main()
