"""One worker thread owns the engine; many clients submit work to it.

Order of work, by design: sentiment requests first (they cost one short prefill), then one token
of each active chat reply in turn. So a sentiment request waits at most for one decode step, never
for a whole reply, and several chats progress together. Queues are bounded: a full queue raises
QueueFull (the HTTP layer answers 503 + Retry-After).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from edge.engine.engine import Engine
from edge.engine.types import ChatMessage, ChatStats, SamplingParams, SentimentResult

log = logging.getLogger(__name__)
SENTIMENT_CHUNK = 8  # a long bulk request yields to chat between chunks of this many texts
# While replies are being generated, at most this many sentiment chunks run between two chat steps:
# sentiment still waits for one token of each reply at most, and a steady stream of sentiment
# requests can no longer starve the replies.
SENTIMENT_BURST = 4


class QueueFull(RuntimeError):
    """Too many requests are waiting; try again later."""


class SchedulerStopped(RuntimeError):
    """The daemon is shutting down."""


_DONE = object()


@dataclass(eq=False)
class ChatHandle:
    """A submitted chat: iterate for text pieces (blocking); `stats` is final once iteration ends."""
    messages: list[ChatMessage]
    params: SamplingParams
    deadline: float | None
    stats: ChatStats = field(default_factory=ChatStats)
    _events: queue.Queue = field(default_factory=queue.Queue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _listener: Callable[[], None] | None = None

    def listen(self, wake: Callable[[], None]) -> None:
        """Call `wake()` (from the engine thread) after each new event, so an event loop can wait
        for pieces without a thread blocked in `get` per stream."""
        self._listener = wake
        if not self._events.empty():
            wake()

    def _emit(self, item: object) -> None:
        self._events.put(item)
        if self._listener is not None:
            try:
                self._listener()
            except Exception:  # a listener must never take the engine thread down
                log.exception("chat listener failed")

    def cancel(self) -> None:
        """Stop generating (client went away); the slot is freed at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def get(self, timeout: float | None = None, block: bool = True) -> object:
        """Next piece (str), or the end marker `ChatHandle.END`; raises the job's error, or
        queue.Empty when nothing came (in time, or at once with block=False)."""
        item = self._events.get(block=block, timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.get()
            if item is _DONE:
                return
            yield item  # type: ignore[misc]

    END = _DONE


@dataclass
class _SentimentJob:
    texts: list[str]
    language: str | None
    future: Future
    results: list[SentimentResult] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine, queue_size: int = 16) -> None:
        self.engine = engine
        self.queue_size = queue_size
        self._sentiment: deque[_SentimentJob] = deque()
        self._pending_chats: deque[ChatHandle] = deque()
        self._active: list[tuple[ChatHandle, Iterator[str]]] = []
        self._cond = threading.Condition()
        self._running = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.on_idle_step = None  # optional callable run by the worker between steps (memory guard)

    # -- client side ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._sentiment) + len(self._pending_chats)

    @property
    def alive(self) -> bool:
        """The worker thread is running (health checks)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_chats(self) -> int:
        return len(self._active)

    def _admit(self) -> None:
        if not self._accepting:
            raise SchedulerStopped("shutting down")
        if self.queue_depth >= self.queue_size:
            raise QueueFull(f"{self.queue_depth} requests waiting")

    def classify(self, texts: list[str], language: str | None = None) -> Future:
        """Future of list[SentimentResult], in the order of `texts`."""
        fut: Future = Future()
        with self._cond:
            self._admit()
            self._sentiment.append(_SentimentJob(list(texts), language, fut))
            self._cond.notify()
        return fut

    def chat(self, messages: list[ChatMessage], params: SamplingParams = SamplingParams(),
             timeout_s: float | None = None) -> ChatHandle:
        handle = ChatHandle(list(messages), params, time.monotonic() + timeout_s if timeout_s else None)
        with self._cond:
            self._admit()
            self._pending_chats.append(handle)
            self._cond.notify()
        return handle

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop accepting; with drain, finish queued and running work first. True if all finished."""
        with self._cond:
            self._accepting = False
            if not drain:
                for h, _ in self._active:
                    h.cancel()
            self._cond.notify()
        end = time.monotonic() + timeout
        while drain and self.queue_depth + len(self._active) and time.monotonic() < end:
            time.sleep(0.05)
        finished = self.queue_depth + len(self._active) == 0
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=max(0.1, end - time.monotonic()))
        return finished

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        burst = 0  # sentiment chunks run since the last chat step
        while True:
            with self._cond:
                while self._running and not (self._sentiment or self._pending_chats or self._active):
                    self._cond.wait(timeout=1.0)
                    self._housekeeping()
                if not self._running:
                    break
                job = self._sentiment[0] if self._sentiment else None
            if job is not None and not ((self._active or self._pending_chats) and burst >= SENTIMENT_BURST):
                self._step_sentiment(job)
                burst += 1
                continue
            burst = 0
            self._start_pending_chats()
            self._step_chats()
            self._housekeeping()
        for h, gen in self._active:  # not drained in time: end the streams cleanly
            gen.close()
            h._emit(_DONE)

    def _housekeeping(self) -> None:
        if self.on_idle_step is not None:
            try:
                self.on_idle_step()
            except Exception:  # never let a monitor kill the worker
                log.exception("housekeeping failed")

    def _step_sentiment(self, job: _SentimentJob) -> None:
        done = len(job.results)
        chunk = job.texts[done:done + SENTIMENT_CHUNK]
        try:
            job.results += self.engine.classify_many(chunk, job.language)
        except Exception as exc:
            with self._cond:
                self._sentiment.popleft()
            job.future.set_exception(exc)
            return
        if len(job.results) == len(job.texts):
            with self._cond:
                self._sentiment.popleft()
            job.future.set_result(job.results)

    def _start_pending_chats(self) -> None:
        while self._pending_chats and len(self._active) < self.engine.n_chat_slots:
            with self._cond:
                handle = self._pending_chats.popleft()
            if handle.cancelled:
                handle.stats.finish_reason = "cancelled"
                handle._emit(_DONE)
                continue
            self._active.append((handle, self.engine.chat_stream(handle.messages, handle.params, handle.stats)))

    def _step_chats(self) -> None:
        for handle, gen in list(self._active):
            reason = "cancelled" if handle.cancelled else (
                "timeout" if handle.deadline and time.monotonic() > handle.deadline else None)
            try:
                if reason:
                    gen.close()
                    handle.stats.finish_reason = reason
                    raise StopIteration
                with self.engine.lock:
                    piece = next(gen)
                if piece:
                    handle._emit(piece)
            except StopIteration:
                self._active.remove((handle, gen))
                handle._emit(_DONE)
            except Exception as exc:
                log.warning("chat failed: %s", exc)
                self._active.remove((handle, gen))
                handle.error = exc
                handle.stats.finish_reason = "error"
                handle._emit(exc)
