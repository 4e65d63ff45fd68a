"""A real uvicorn server on a free loopback port, in a thread, over the tiny model (API tests)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import uvicorn

from edge.api import ServingState, create_app
from edge.settings import Settings, load_settings

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def api_settings(model: dict | None = None, server: dict | None = None, chat: dict | None = None,
                 memory: dict | None = None, engine: dict | None = None) -> Settings:
    # n_ctx 4096: the tiny model's byte-level tokenizer makes the prompts long
    return load_settings(None, model={"n_ctx": 4096, "n_batch": 256, "n_threads": 2, **(model or {})},
                         prompts={"dir": PROMPTS, "max_text_tokens": 96},
                         chat={"max_tokens": 12, "temperature": 0.0, **(chat or {})},
                         server=server or {}, memory=memory or {},
                         engine={"prefix_tokens": 2048, **(engine or {})})  # the tiny tokenizer writes long prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, serving: ServingState, api_key: str | None = None) -> None:
        self.serving = serving
        self.app = create_app(serving, api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kw})


@contextmanager
def serving_engine(gguf: Path, settings: Settings, api_key: str | None = None) -> Iterator[LiveServer]:
    """Load the engine, serve it on loopback, tear everything down afterwards."""
    from edge.engine.engine import Engine

    engine = Engine.load(gguf, settings)
    serving = ServingState(settings)
    serving.attach(engine)
    live = LiveServer(serving, api_key).start()
    try:
        yield live
    finally:
        live.stop()
        serving.stop(drain=False, timeout=10)
        engine.close()


def ndjson_lines(response: httpx.Response) -> list[dict]:
    import json
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def sse_events(response: httpx.Response) -> list:
    """Parse an SSE body: the JSON of each `data:` event, and the literal "[DONE]"."""
    import json
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events
