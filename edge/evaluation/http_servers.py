"""The servers `qwen-edge bench http` measures, and the one client that talks to both.

*Ours* is the daemon: started for a turn (``qwen-edge serve --model M`` on a free port) or already
running at a URL. The *peer* is llama.cpp's ``llama-server`` on the same model file, started for a
turn with the daemon's KV type, flash attention and thread count. A harness that starts both runs
them one after the other, never both loaded at once, so neither pays for the other's memory or
threads. The client code (httpx, OpenAI streaming, the parsing of events) is the same for both.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edge.evaluation.load import daemon_pid

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """A server under test did not start, or stopped while measured."""


@dataclass
class Server:
    """One running server under test: how to ask it for a label and for a streamed reply."""
    name: str
    url: str
    pid: int | None
    classify: Callable[[httpx.Client, str], str]
    headers: dict = field(default_factory=dict)
    command: list[str] | None = None                 # how the harness started it (None: already running)
    chat_slots: tuple[int, ...] = ()                 # llama-server: slots chat streams are pinned to

    def chat_fields(self, stream: int) -> dict:
        """Extra fields of chat stream number ``stream``: its own slot, when chat is kept off one."""
        return {"id_slot": self.chat_slots[stream % len(self.chat_slots)]} if self.chat_slots else {}

    def client(self, timeout_s: float = 300.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s, headers=self.headers)


@dataclass(frozen=True)
class OursSpec:
    """Our daemon: start ``qwen-edge serve --model model`` per turn, or use the one at ``url``."""
    model: Path | None = None
    url: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class PeerSpec:
    """llama-server on ``model``; ``ctx_per_slot`` tokens of context for each of its slots."""
    binary: Path
    model: Path
    ctx_per_slot: int
    threads: int
    kv_cache_type: str
    prompts_dir: Path
    extra_args: tuple[str, ...] = ()


# -- process plumbing -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def physical_cores() -> int:
    """What the daemon resolves ``model.n_threads = 0`` to, so the peer gets as many threads."""
    import psutil
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = READY_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server at {url} exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ServerError(f"server at {url} not ready after {timeout_s:.0f} s")


@contextmanager
def _process(cmd: list[str], url: str) -> Iterator[subprocess.Popen]:
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


# -- our daemon -----------------------------------------------------------------------------------

def _ours(url: str, api_key: str | None, pid: int | None, command: list[str] | None) -> Server:
    def classify(client: httpx.Client, text: str) -> str:
        r = client.post("/v1/sentiment", json={"text": text})
        r.raise_for_status()
        return r.json()["label"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return Server("qwen-edge", url, pid or daemon_pid(url), classify, headers=headers, command=command)


@contextmanager
def run_ours(spec: OursSpec) -> Iterator[Server]:
    """Our daemon for one turn: started and stopped around it when ``spec.model`` is set."""
    if spec.model is None:
        url = (spec.url or "http://127.0.0.1:11434").rstrip("/")
        wait_ready(url, None)
        yield _ours(url, spec.api_key, None, None)
        return
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-c", "from edge.cli import main; main()", "serve", "--model", str(spec.model),
           "--port", str(httpx.URL(url).port)]
    with _process(cmd, url) as proc:
        yield _ours(url, spec.api_key, proc.pid, cmd)


def served_model(server: Server) -> dict:
    """The daemon's /health model facts: path, n_ctx, kv_cache_type, ..."""
    with server.client(30) as client:
        return client.get("/health").json()["model"]


# -- llama-server ---------------------------------------------------------------------------------

def sentiment_prompt(prompts_dir: Path) -> tuple[str, str, dict[str, str], str]:
    """ChatML of our English few-shot sentiment prompt up to the text, after it, the label map, the grammar."""
    from edge.engine.tasks import load_task
    p = load_task(prompts_dir / "tasks" / "sentiment").languages["en"]

    def turn(role: str, text: str) -> str:
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"
    head = turn("system", p.system) + "".join(turn("user", t) + turn("assistant", answer)
                                              for t, answer in p.examples)
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    return head + "<|im_start|>user\n", tail, {v: k for k, v in p.labels.items()}, p.grammar


def peer_command(spec: PeerSpec, port: int, slots: int, sentiment_slot: bool) -> list[str]:
    """llama-server's command line: ``slots`` parallel slots, continuous batching, our KV type.

    With a sentiment slot each slot keeps its own cache (``--no-kv-unified``), so chat never evicts
    the sentiment prefix: llama-server's best set-up for that work. No host-RAM prompt cache
    (``--cache-ram 0``): the daemon has none either, and it would only add to the peer's RSS.
    """
    cmd = [str(spec.binary), "-m", str(spec.model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(spec.ctx_per_slot * slots), "-t", str(spec.threads), "--cont-batching",
           "-fa", "on", "-ctk", spec.kv_cache_type, "-ctv", spec.kv_cache_type, "--cache-ram", "0", "--no-webui"]
    if sentiment_slot:
        cmd.append("--no-kv-unified")
    return cmd + list(spec.extra_args)


def _peer_classify(prompts_dir: Path) -> Callable[[httpx.Client, str], str]:
    head, tail, labels, grammar = sentiment_prompt(prompts_dir)

    def classify(client: httpx.Client, text: str) -> str:
        r = client.post("/completion", json={"prompt": head + text + tail, "grammar": grammar, "n_predict": 8,
                                             "temperature": 0, "cache_prompt": True, "id_slot": 0})
        r.raise_for_status()
        return labels.get(r.json()["content"].strip(), "?")
    return classify


@contextmanager
def run_peer(spec: PeerSpec, chat_slots: int, sentiment_slot: bool) -> Iterator[Server]:
    """llama-server for one turn: ``chat_slots`` slots for chat, plus slot 0 for sentiment if asked."""
    port = free_port()
    slots = chat_slots + (1 if sentiment_slot else 0)
    cmd = peer_command(spec, port, slots, sentiment_slot)
    with _process(cmd, f"http://127.0.0.1:{port}") as proc:
        # Unpinned, a chat could land on the idle sentiment slot and make the next label wait for a
        # whole reply: with a sentiment slot, chat stream i is pinned to slot 1 + i.
        pinned = tuple(range(1, slots)) if sentiment_slot else ()
        yield Server("llama-server", f"http://127.0.0.1:{port}", proc.pid, _peer_classify(spec.prompts_dir),
                     command=cmd, chat_slots=pinned)


# -- measuring ------------------------------------------------------------------------------------

class RssSampler:
    """Peak and last resident set size of a process, sampled every 100 ms in a thread."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.peak, self.last = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
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


class OtherCpu:
    """The share of the machine's CPU time that went to neither the server under test nor this
    client while the block ran: the background load (other processes, the hypervisor's steal)
    that makes one turn slower than another. 0.0 on a quiet machine, 1.0 when others had it all."""

    def __init__(self, pid: int | None) -> None:
        import psutil
        self._procs = [psutil.Process()] + ([psutil.Process(pid)] if pid and pid != os.getpid() else [])
        self.share: float | None = None

    @staticmethod
    def _busy() -> float:
        import psutil
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _ours(self) -> float:
        import psutil
        try:
            return sum(sum(p.cpu_times()[:4]) for p in self._procs)   # user, system, children's
        except psutil.Error:
            return 0.0

    def __enter__(self) -> "OtherCpu":
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        capacity = (time.monotonic() - self._t0) * (os.cpu_count() or 1)
        others = (self._busy() - self._busy0) - (self._ours() - self._ours0)
        self.share = round(min(1.0, max(0.0, others / capacity)), 3) if capacity > 0 else None


@dataclass
class StreamResult:
    """One streamed reply as the client saw it (perf_counter seconds)."""
    sent: float
    first: float | None = None
    last: float | None = None
    chunks: int = 0                                   # content events: one per token on both servers
    chunk_times: list[float] = field(default_factory=list, repr=False)
    usage_tokens: int | None = None                   # completion_tokens, when the server reports usage

    @property
    def tokens(self) -> int:
        # a reply cut short (request time limit) may report fewer tokens than were seen
        return max(self.usage_tokens or 0, self.chunks)


def _content(event: dict) -> str:
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def stream_chat(client: httpx.Client, server: Server, messages: list[dict], max_tokens: int,
                stop: threading.Event | None = None, stream: int = 0, seed: int = 0,
                into: StreamResult | None = None) -> StreamResult:
    """One OpenAI streamed chat reply, greedy, as chat stream number ``stream``; ``stop`` ends reading
    early (the result is then partial). ``into`` is filled as events arrive, for a watcher."""
    body = {"model": "any", "stream": True, "max_tokens": max_tokens, "temperature": 0, "seed": seed,
            "messages": messages, "stream_options": {"include_usage": True}, **server.chat_fields(stream)}
    result = into or StreamResult(sent=0.0)
    result.sent = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                result.usage_tokens = event["usage"].get("completion_tokens")
            if _content(event):
                result.last = time.perf_counter()
                result.first = result.first or result.last
                result.chunks += 1
                result.chunk_times.append(result.last)
    return result


def classify_timed(server: Server, client: httpx.Client, text: str) -> tuple[str, float]:
    """(label, milliseconds); an idle keep-alive connection the server closed is retried once."""
    for attempt in range(2):
        t0 = time.perf_counter()
        try:
            return server.classify(client, text), (time.perf_counter() - t0) * 1000
        except httpx.RemoteProtocolError:
            if attempt:
                raise
    raise AssertionError("unreachable")
