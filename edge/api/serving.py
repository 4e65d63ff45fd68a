"""What every protocol module talks to: the one loaded model behind its scheduler, plus status.

The protocol modules (native, openai, ollama) translate requests into calls here and translate the
results back; none of them touches the engine directly. Admission (loading, memory pressure, full
queue) is decided here, so every protocol refuses work the same way.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

from edge.api.access import add_chat_usage, add_usage
from edge.engine.chat import ReplyFormat
from edge.engine.engine import SENTIMENT
from edge.engine.runtime import release_free_heap
from edge.engine.scheduler import ChatHandle, Scheduler
from edge.engine.task_runner import SentimentResult, TaskResult
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.model.gguf_check import GGUFInfo, check_gguf
from edge.settings import Settings

if TYPE_CHECKING:
    from fastapi import Request

    from edge.engine.engine import Engine

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class MemoryMonitor(Protocol):
    """What the API needs of the daemon's memory guard (edge.daemon.memory_guard.MemoryGuard)."""

    @property
    def accepting_work(self) -> bool: ...

    def snapshot(self) -> dict: ...


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class MemoryPressure(RuntimeError):
    """Memory is above the hard limit: new work is refused until it comes back down."""


class RequestTimeout(TimeoutError):
    """The request ran past server.request_timeout_s."""


class ClientGone(Exception):
    """The client disconnected while its request waited."""


@dataclass
class ServingState:
    """The daemon's shared state, stored on ``app.state.serving``."""
    settings: Settings
    guard: MemoryMonitor | None = None
    engine: "Engine | None" = None
    scheduler: Scheduler | None = None
    model_info: dict = field(default_factory=dict)   # GGUF facts for /api/tags, /api/show, /v1/models
    status: str = "loading"                            # loading | ready | failed | stopping
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    loaded_at: float | None = None
    _notes: set[str] = field(default_factory=set)
    _shed_requested: threading.Event = field(default_factory=threading.Event)
    _pending_reload: "Callable[[], None] | None" = None

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, engine: "Engine", scheduler: Scheduler | None = None) -> None:
        """Serve ``engine``: start its scheduler and hook the memory guard's soft-limit action."""
        sched = scheduler or Scheduler(engine, self.settings.server.queue_size)
        sched.on_idle_step = self._idle_step
        if scheduler is None:
            sched.start()
        self.engine, self.scheduler = engine, sched
        self.model_info = {**engine.info(), **model_facts(check_gguf(engine.rt.path)), **self.model_info}
        self.loaded_at = time.time()
        self.status = "ready"

    def note_once(self, what: str) -> bool:
        """True the first time `what` is seen: for log lines a client would otherwise repeat per request."""
        if what in self._notes:
            return False
        self._notes.add(what)
        return True

    def fail(self, message: str) -> None:
        self.status, self.error = "failed", message

    def request_shed(self, *_: object) -> None:
        """Memory guard callback (any thread): ask the engine worker to drop idle sessions."""
        self._shed_requested.set()

    def request_reload(self, action: "Callable[[], None]") -> None:
        """Run ``action`` (SIGHUP: new prompts/config) on the engine worker once no reply is running:
        rebuilding prompts clears the KV cache, which a reply in progress still uses."""
        self._pending_reload = action

    def _idle_step(self) -> None:
        # Runs on the scheduler's worker thread, the only thread that may touch the engine freely.
        if self._shed_requested.is_set() and self.engine is not None:
            self._shed_requested.clear()
            dropped = self.engine.drop_idle()
            release_free_heap()  # what the dropped sessions' Python objects freed goes back to the OS
            log.warning("memory pressure: dropped %d idle chat sessions", dropped)
        action = self._pending_reload
        if action is not None and self.scheduler is not None and self.scheduler.active_chats == 0:
            self._pending_reload = None
            try:
                action()
            except Exception as exc:  # a bad edit must not take the daemon down: old state stays
                log.error("reload failed, keeping the running configuration: %s", exc)

    def stop(self, drain: bool = True, timeout: float = 30.0) -> bool:
        self.status = "stopping"
        if self.scheduler is None:
            return True
        return self.scheduler.stop(drain=drain, timeout=timeout)

    # -- status ---------------------------------------------------------------------------------
    @property
    def health(self) -> str:
        """loading | ready | degraded | failed | stopping, as /health reports it."""
        if self.status != "ready":
            return self.status
        memory_ok = self.guard is None or self.guard.snapshot().get("state", "ok") == "ok"
        worker_ok = self.scheduler is not None and self.scheduler.alive
        return "ready" if memory_ok and worker_ok else "degraded"

    def _admit(self) -> Scheduler:
        if self.status != "ready" or self.scheduler is None:
            raise NotReady(self.error or f"the model is {self.status}")
        if self.guard is not None and not self.guard.accepting_work:
            raise MemoryPressure("memory is above the hard limit; try again shortly")
        return self.scheduler

    # -- work -----------------------------------------------------------------------------------
    async def run_task(self, task: str, texts: list[str], language: str | None = None,
                       request: "Request | None" = None) -> list[TaskResult]:
        """Results of `task` for `texts`, in order; waits without holding a thread, gives up when
        the client leaves or the request runs past server.request_timeout_s."""
        future = self._admit().run_task(task, texts, language)
        waiting = asyncio.wrap_future(future)
        deadline = time.monotonic() + self.settings.server.request_timeout_s
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
            if done:
                results = waiting.result()
                if request is not None:
                    add_usage(request, texts=len(results), text_tokens=sum(r.n_tokens for r in results))
                return results
            if time.monotonic() > deadline:
                future.cancel()
                raise RequestTimeout(f"{task} took longer than {self.settings.server.request_timeout_s:g} s")
            if request is not None and await request.is_disconnected():
                future.cancel()
                raise ClientGone()

    async def classify(self, texts: list[str], language: str | None = None,
                       request: "Request | None" = None) -> list[SentimentResult]:
        return await self.run_task(SENTIMENT, texts, language, request)

    def chat(self, messages: list[ChatMessage], params: SamplingParams, fmt: ReplyFormat = ReplyFormat()) -> ChatHandle:
        return self._admit().chat(messages, params, timeout_s=self.settings.server.request_timeout_s, fmt=fmt)


def model_facts(info: GGUFInfo) -> dict:
    """What clients are told about the model file (Ollama's /api/tags and /api/show, /health)."""
    stat = info.path.stat()
    n = info.n_params
    return {
        "path": str(info.path), "file_type": info.file_type, "arch": info.arch, "size_bytes": info.size_bytes,
        "n_params": n, "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
        "n_ctx_train": info.n_ctx_train, "n_layer": info.n_layer, "n_embd": info.n_embd,
        # a cheap stable id (hashing 400 MB at every start would cost seconds on a Pi)
        "digest": hashlib.sha256(f"{info.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest(),
        "modified_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
    }


class LoopWaker:
    """Sets asyncio events of one event loop on behalf of the engine thread, from a thread of its own.

    Waking a loop writes to its self-pipe, a system call that gives up the GIL, and the loop thread
    it wakes then takes the GIL to send the piece: the engine thread would wait for that before it
    could start the next token's decode. Handing the wake to this thread costs the engine thread a
    lock release instead, and the wake runs while the model computes (llama_decode runs without the
    GIL). Wakes that pile up are sent in one go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: set[asyncio.Event] = set()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="loop-waker", daemon=True)
        self.thread.start()

    def wake(self, event: asyncio.Event) -> None:
        with self._cond:
            self._pending.add(event)
            self._cond.notify()

    def _run(self) -> None:
        while not self.loop.is_closed():
            with self._cond:
                if not self._pending:
                    self._cond.wait(timeout=1.0)  # and look again whether the loop has closed
                events, self._pending = self._pending, set()
            if events:
                try:
                    self.loop.call_soon_threadsafe(_set_all, events)
                except RuntimeError:  # the loop has closed (shutdown): nobody is waiting any more
                    return
                except Exception:  # never die quietly: every stream of this loop waits on us
                    log.exception("waking the event loop failed")


def _set_all(events: set[asyncio.Event]) -> None:
    for event in events:
        event.set()


_wakers: dict[asyncio.AbstractEventLoop, LoopWaker] = {}
_wakers_lock = threading.Lock()


def loop_waker() -> LoopWaker:
    """The waker of the running event loop (one thread per loop, ended when the loop closes)."""
    loop = asyncio.get_running_loop()
    with _wakers_lock:
        for old in [k for k in _wakers if k.is_closed()]:
            del _wakers[old]
        if loop not in _wakers or not _wakers[loop].thread.is_alive():
            _wakers[loop] = LoopWaker(loop)
        return _wakers[loop]


class ChatStream:
    """Async view of a ChatHandle: pieces as they come; cancels generation when dropped early."""

    def __init__(self, handle: ChatHandle, request: "Request | None" = None,
                 on_end: "Callable[[ChatStats], None] | None" = None) -> None:
        self.handle = handle
        self.request = request
        self.on_end = on_end
        self._first: list[object] = []
        self._checked = time.monotonic()
        self._ready: asyncio.Event | None = None

    @property
    def stats(self) -> ChatStats:
        return self.handle.stats

    async def _check_client(self) -> None:
        self._checked = time.monotonic()
        if self.request is not None and await self.request.is_disconnected():
            self.handle.cancel()
            raise ClientGone()

    def _listen(self) -> asyncio.Event:
        # The engine thread wakes this loop once per piece (through the loop's waker), so an open
        # stream holds no thread (waiting in anyio's worker pool parked one per stream, from 40
        # shared with other calls).
        ready = asyncio.Event()
        waker = loop_waker()
        self.handle.listen(lambda: waker.wake(ready))
        return ready

    async def _next(self) -> object:
        if self._ready is None:
            self._ready = self._listen()
        while True:
            self._ready.clear()  # before looking, so a piece put after the look still wakes us
            try:
                item = self.handle.get(block=False)
            except queue.Empty:
                try:
                    await asyncio.wait_for(self._ready.wait(), POLL_S)
                except asyncio.TimeoutError:  # nothing yet
                    await self._check_client()
                continue
            if time.monotonic() - self._checked > POLL_S:  # pieces flowing: still look now and then
                await self._check_client()
            return item

    async def prime(self) -> None:
        """Wait for the first piece, so errors found before generation (context overflow) can
        still become an HTTP status instead of an event inside a started stream."""
        item = await self._next()
        self._first.append(item)

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                item = self._first.pop() if self._first else await self._next()
                if item is ChatHandle.END:
                    return
                yield item  # type: ignore[misc]
        finally:
            self.handle.cancel()  # a no-op when finished; stops generation when the client left
            if self.request is not None:
                add_chat_usage(self.request, self.handle.stats)
            if self.on_end is not None:
                self.on_end(self.handle.stats)

    async def text(self) -> str:
        return "".join([p async for p in self.pieces()])
