"""`qwen-edge bench http`: the daemon measured over loopback, and the same work on llama.cpp's
`llama-server` in the same run (``--peer-server PATH``).

Work, identical on both servers; both are started, then rounds alternate between them (one server
busy at a time, so they never share the CPU, and background load on the machine hits both alike):
1. sentiment latency: SST-2 texts sent one by one while ``--chat-streams`` chat replies stream
   continuously in the background; on llama-server the sentiment runs with the same GBNF grammar
   and the same few-shot prompt on a dedicated, prompt-cached slot, chat on the other slot(s);
2. chat decode speed: one streamed reply alone per round, tokens after the first / time after the first;
3. RSS of the server process: peak and at the end (sampled every 100 ms).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

from edge.settings import PROJECT_ROOT

DEFAULT_TEXTS = PROJECT_ROOT.parent / "shared" / "data" / "sentiment" / "sst2_dev.tsv"
STORY = "Tell me a long, detailed story about a lighthouse keeper and a storm."
TARGETS = {"p50_ms": "below peer", "p90_ms": "below peer", "decode_tps": ">= 0.95 x peer", "rss_peak_mb": "<= peer"}


@dataclass
class Server:
    """One server under test: how to ask it for a label and for a streamed reply."""
    name: str
    url: str
    pid: int | None
    classify: Callable[[httpx.Client, str], str]
    chat_extra: dict = field(default_factory=dict)   # extra fields of the chat request (llama-server: slot)
    headers: dict = field(default_factory=dict)


# -- servers --------------------------------------------------------------------------------------

def _wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = 600) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise click.ClickException(f"server at {url} exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"server at {url} not ready after {timeout_s:.0f} s")


def _listening_pid(port: int) -> int | None:
    import psutil
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(url: str, api_key: str | None, pid: int | None) -> Server:
    def classify(client: httpx.Client, text: str) -> str:
        r = client.post("/v1/sentiment", json={"text": text})
        r.raise_for_status()
        return r.json()["label"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    port = httpx.URL(url).port or 80
    return Server("qwen-edge", url, pid or _listening_pid(port), classify, headers=headers)


def sentiment_prompt(prompts_dir: Path) -> tuple[str, str, dict[str, str], str]:
    """ChatML of our English few-shot sentiment prompt up to the text, after it, the label map, the grammar."""
    from edge.engine.prompts import load_prompts
    p = load_prompts(prompts_dir, neutral=False, few_shot=True).sentiment["en"]
    turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"  # noqa: E731
    head = turn("system", p.system) + "".join(turn("user", t) + turn("assistant", p.labels[lab]) for t, lab in p.examples)
    return head + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", {v: k for k, v in p.labels.items()}, p.grammar


def peer(url: str, pid: int, prompts_dir: Path) -> Server:
    head, tail, labels, grammar = sentiment_prompt(prompts_dir)

    def classify(client: httpx.Client, text: str) -> str:
        r = client.post("/completion", json={"prompt": head + text + tail, "grammar": grammar, "n_predict": 8,
                                             "temperature": 0, "cache_prompt": True, "id_slot": 0})
        r.raise_for_status()
        return labels.get(r.json()["content"].strip(), "?")
    return Server("llama-server", url, pid, classify, chat_extra={"id_slot": 1})


def start_peer(binary: Path, model: Path, n_ctx: int, threads: int, chat_streams: int, kv_cache_type: str,
               extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    slots = 1 + chat_streams
    # its best configuration for this work: each slot keeps its own cache (the sentiment prefix is never
    # evicted by chat), no host-RAM prompt cache; same KV type and flash attention as ours
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx * slots),
           "-np", str(slots), "--no-kv-unified", "--cache-ram", "0", "-t", str(threads), "-fa", "on",
           "-ctk", kv_cache_type, "-ctv", kv_cache_type, "-ngl", "0", "--no-webui", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_ours(model: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from edge.cli import main; main()", "serve", "--model", str(model),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


# -- measurements ---------------------------------------------------------------------------------

class RssSampler:
    def __init__(self, pid: int | None) -> None:
        self.pid, self.peak, self.last = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        proc = psutil.Process(self.pid)
        while not self._stop.wait(0.1):
            try:
                self.last = proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)

    def __enter__(self) -> "RssSampler":
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)


def stream_chat(client: httpx.Client, server: Server, max_tokens: int, system: str,
                stop: threading.Event | None = None) -> tuple[int, float]:
    """One streamed reply; (content chunks, seconds from the first chunk to the last)."""
    body = {"model": "any", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": STORY}],
            **server.chat_extra}
    n, first, last = 0, None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
    return n, (last - first) if first and last else 0.0


@dataclass
class Tally:
    """What one server accumulated over the rounds."""
    latencies: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    correct: int = 0


def _classify_timed(server: Server, client: httpx.Client, text: str) -> tuple[str, float]:
    for attempt in range(2):
        t0 = time.perf_counter()
        try:
            return server.classify(client, text), (time.perf_counter() - t0) * 1000
        except httpx.RemoteProtocolError:  # an idle keep-alive connection closed by the server: once more
            if attempt:
                raise
    raise AssertionError("unreachable")


def warm_up(server: Server, texts: list[tuple[str, str]], system: str) -> None:
    with httpx.Client(base_url=server.url, timeout=300, headers=server.headers) as client:
        for text, _ in texts[:5]:                                # prompt caches, first allocations
            server.classify(client, text)
        stream_chat(client, server, 8, system)


def run_round(server: Server, texts: list[tuple[str, str]], chat_streams: int, chat_tokens: int, system: str,
              tally: Tally) -> None:
    """One chat reply alone (decode speed), then ``texts`` classified while replies stream."""
    with httpx.Client(base_url=server.url, timeout=300, headers=server.headers) as client:
        n, seconds = stream_chat(client, server, chat_tokens, system)
        tally.decode.append((n - 1) / seconds if seconds > 0 else 0.0)
        stop = threading.Event()

        def chat_loop() -> None:
            with httpx.Client(base_url=server.url, timeout=300, headers=server.headers) as c:
                while not stop.is_set():
                    stream_chat(c, server, 256, system, stop)
        background = [threading.Thread(target=chat_loop, daemon=True) for _ in range(chat_streams)]
        for t in background:
            t.start()
        time.sleep(0.5)                                          # the replies are streaming
        for text, label in texts:
            got, ms = _classify_timed(server, client, text)
            tally.latencies.append(ms)
            tally.correct += got == label
        stop.set()
        for t in background:
            t.join(60)


def measure(servers: list[Server], texts: list[tuple[str, str]], chat_streams: int, chat_tokens: int,
            system: str, rounds: int) -> list[dict]:
    """Rounds alternate between the servers, so background load on the machine hits both alike."""
    for server in servers:
        warm_up(server, texts, system)
    tallies = [Tally() for _ in servers]
    samplers = [RssSampler(s.pid).__enter__() for s in servers]
    try:
        chunk = -(-len(texts) // rounds)
        for r in range(rounds):
            part = texts[r * chunk:(r + 1) * chunk]
            for server, tally in zip(servers, tallies):
                run_round(server, part, chat_streams, chat_tokens, system, tally)
    finally:
        for sampler in samplers:
            sampler.__exit__()
    rows = []
    for server, tally, rss in zip(servers, tallies, samplers):
        q = statistics.quantiles(tally.latencies, n=10)
        rows.append({"server": server.name, "texts": len(tally.latencies),
                     "p50_ms": round(statistics.median(tally.latencies), 1), "p90_ms": round(q[8], 1),
                     "accuracy": round(tally.correct / len(tally.latencies), 3),
                     "decode_tps": round(statistics.median(tally.decode), 1),
                     "rss_peak_mb": round(rss.peak / 1e6) if rss.peak else None,
                     "rss_end_mb": round(rss.last / 1e6) if rss.last else None})
    return rows


def read_texts(path: Path, limit: int) -> list[tuple[str, str]]:
    from edge.evaluation.datasets import read_tsv
    return [(e.text, e.label) for e in read_tsv(path)][:limit]


def _verdict(mine: dict, theirs: dict) -> dict:
    return {"p50_ms": mine["p50_ms"] < theirs["p50_ms"], "p90_ms": mine["p90_ms"] < theirs["p90_ms"],
            "decode_tps": mine["decode_tps"] >= 0.95 * theirs["decode_tps"],
            "rss_peak_mb": None if not (mine["rss_peak_mb"] and theirs["rss_peak_mb"])
            else mine["rss_peak_mb"] <= theirs["rss_peak_mb"]}


def _print(rows: list[dict], verdict: dict | None) -> None:
    cols = ("server", "texts", "p50_ms", "p90_ms", "accuracy", "decode_tps", "rss_peak_mb", "rss_end_mb")
    click.echo(" | ".join(cols))
    for row in rows:
        click.echo(" | ".join(str(row.get(c)) for c in cols))
    if verdict:
        click.echo("targets: " + ", ".join(f"{k} {TARGETS[k]}: {'met' if ok else 'MISSED' if ok is not None else 'n/a'}"
                                           for k, ok in verdict.items()))


# -- command --------------------------------------------------------------------------------------

@click.command("http")
@click.option("--url", default=None, help="Running daemon to measure (default http://127.0.0.1:11434).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start `qwen-edge serve --model M` for the run instead of using --url.")
@click.option("--api-key", envvar="QWEN_EDGE_SERVER__API_KEY", default=None, help="Bearer key of the daemon.")
@click.option("--peer-server", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="llama.cpp `llama-server` binary: run the same work on it, same model file.")
@click.option("--peer-ctx", default=2048, show_default=True, help="llama-server context per slot.")
@click.option("--threads", default=2, show_default=True, help="llama-server threads (match model.n_threads).")
@click.option("--peer-arg", "peer_args", multiple=True, help="Extra llama-server argument (repeatable), "
              "e.g. --peer-arg=--load-mode --peer-arg=none.")
@click.option("--texts", "texts_file", type=click.Path(exists=True, path_type=Path), default=DEFAULT_TEXTS,
              show_default=True)
@click.option("--limit", default=200, show_default=True, help="Texts to classify.")
@click.option("--chat-streams", default=1, show_default=True, help="Replies streaming during the sentiment run.")
@click.option("--chat-tokens", default=128, show_default=True, help="Reply length for the decode-speed runs.")
@click.option("--rounds", default=5, show_default=True, help="Rounds alternating between the servers.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results here.")
def bench_http(url: str | None, model: Path | None, api_key: str | None, peer_server: Path | None, peer_ctx: int,
               threads: int, peer_args: tuple[str, ...], texts_file: Path, limit: int, chat_streams: int,
               chat_tokens: int, rounds: int, json_out: Path | None) -> None:
    """Sentiment latency under chat load, chat decode speed and RSS over HTTP; optionally vs llama-server."""
    from edge.settings import load_settings
    settings = load_settings()
    system = (settings.prompts.dir / "chat" / "system.txt").read_text(encoding="utf-8").strip()
    texts = read_texts(texts_file, limit)
    procs: list[subprocess.Popen] = []
    try:
        if model is not None:
            own, url = start_ours(model)
            procs.append(own)
        url = (url or "http://127.0.0.1:11434").rstrip("/")
        _wait_ready(url, procs[0] if procs else None)
        served = httpx.get(url + "/health", timeout=10).json()["model"]
        model_path = Path(served["path"])
        servers = [ours(url, api_key, procs[0].pid if procs else None)]
        if peer_server is not None:
            proc, peer_url = start_peer(peer_server, model_path, peer_ctx, threads, chat_streams,
                                        served["kv_cache_type"], peer_args)
            procs.append(proc)
            _wait_ready(peer_url, proc)
            servers.append(peer(peer_url, proc.pid, settings.prompts.dir))
        rows = measure(servers, texts, chat_streams, chat_tokens, system, rounds)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    verdict = _verdict(rows[0], rows[1]) if len(rows) == 2 else None
    _print(rows, verdict)
    if json_out is not None:
        tmp = json_out.with_name(f".{json_out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"model": str(model_path), "results": rows, "targets_met": verdict}, indent=2))
        os.replace(tmp, json_out)
