"""What every protocol module talks to: the one loaded model behind its scheduler, plus status.

The protocol modules (native, openai, ollama) translate requests into calls here and translate the
results back; none of them touches the engine directly. Admission (loading, memory pressure, full
queue) is decided here (admission.py), so every protocol refuses work the same way. Streams live in
streaming.py, the model facts clients see in model_facts.py.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.api.access import add_usage
from edge.api.admission import POLL_S, ClientGone, MemoryMonitor, MemoryPressure, NotReady, RequestTimeout, admit
from edge.api.model_facts import model_facts
from edge.api.streaming import ChatStream, LoopWaker, loop_waker
from edge.engine.engine import SENTIMENT
from edge.engine.process_memory import release_free_heap
from edge.engine.reply import ReplyFormat
from edge.engine.scheduler import ChatHandle, Scheduler
from edge.engine.task_runner import SentimentResult, TaskResult
from edge.engine.types import ChatMessage, SamplingParams
from edge.model.gguf_check import check_gguf
from edge.settings import Settings

if TYPE_CHECKING:
    from fastapi import Request

    from edge.engine.engine import Engine

log = logging.getLogger(__name__)
# names other modules imported from here before streaming.py, admission.py and model_facts.py
__all__ = ["ServingState", "ChatStream", "LoopWaker", "loop_waker", "model_facts", "ClientGone", "MemoryMonitor",
           "MemoryPressure", "NotReady", "RequestTimeout", "POLL_S"]


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
        return admit(self.status, self.error, self.scheduler, self.guard)

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


