"""One worker thread owns the engine; many clients submit work to it.

Clients put requests in an inbox (never blocking on the engine); the worker turns them into jobs
(building a prompt reads engine state, so it happens on the worker) and steps the batcher: every
step is one llama_decode for every running job (batcher.py says what a step holds and why). Bounded:
more than `queue_size` requests not yet started raises QueueFull (the HTTP layer answers 503).
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

from edge.engine.engine import SENTIMENT, Engine
from edge.engine.reply import GenerateJob, ReplyFormat
from edge.engine.task_runner import TaskJob, TaskResult
from edge.engine.types import ChatMessage, ChatStats, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting; try again later."""


class SchedulerStopped(RuntimeError):
    """The daemon is shutting down."""


_DONE = object()


@dataclass(eq=False)
class ChatHandle:
    """A submitted chat: iterate for text pieces (blocking); `stats` is final once iteration ends
    (tool calls the model made are in `stats.tool_calls`)."""
    messages: list[ChatMessage]
    params: SamplingParams
    deadline: float | None
    fmt: ReplyFormat = field(default_factory=ReplyFormat)
    stats: ChatStats = field(default_factory=ChatStats)
    _events: queue.Queue = field(default_factory=queue.Queue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    job: GenerateJob | None = None
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
        if self.job is not None:
            self.job.cancel_requested = True

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def started(self) -> bool:
        return self.job is not None and self.job.seq is not None

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

    def _ended(self, job: GenerateJob) -> None:
        if job.error is not None:
            self.error = job.error
            self._emit(job.error)
        else:
            self._emit(_DONE)

    END = _DONE


@dataclass(eq=False)
class TaskRequest:
    """Texts of one task request; the future gets the results in order, or the first error."""
    task: str
    texts: list[str]
    language: str | None
    future: Future
    jobs: list[TaskJob] = field(default_factory=list)
    left: int = 0

    @property
    def started(self) -> bool:
        return any(j.seq is not None or j.done for j in self.jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel_requested = True

    def _ended(self, job: TaskJob) -> None:
        self.left -= 1
        if self.left or self.future.done():
            return
        failed = next((j.error for j in self.jobs if j.error is not None), None)
        if failed is not None:
            self.future.set_exception(failed)
        else:
            self.future.set_result([j.result for j in self.jobs])


class Scheduler:
    def __init__(self, engine: Engine, queue_size: int = 16) -> None:
        self.engine = engine
        self.queue_size = queue_size
        self._inbox: deque[TaskRequest | ChatHandle] = deque()
        self._open: list[TaskRequest | ChatHandle] = []   # built into jobs, not finished
        self._cond = threading.Condition()
        self._running = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.on_idle_step: Callable[[], None] | None = None  # run by the worker between steps (memory guard)

    # -- client side ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests not yet started by the engine."""
        return len(self._inbox) + sum(1 for r in list(self._open) if not r.started)

    @property
    def alive(self) -> bool:
        """The worker thread is running (health checks)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_chats(self) -> int:
        return sum(1 for r in list(self._open) if isinstance(r, ChatHandle) and r.started)

    @property
    def busy(self) -> bool:
        return bool(self._inbox or self._open)

    def _admit(self, request: TaskRequest | ChatHandle) -> None:
        with self._cond:
            if not self._accepting:
                raise SchedulerStopped("shutting down")
            if self.queue_depth >= self.queue_size:
                raise QueueFull(f"{self.queue_depth} requests waiting")
            self._inbox.append(request)
            self._cond.notify()

    def run_task(self, task: str, texts: list[str], language: str | None = None) -> Future:
        """Future of list[TaskResult], in the order of `texts`."""
        request = TaskRequest(task, list(texts), language, Future())
        request.future.add_done_callback(lambda f: request.cancel() if f.cancelled() else None)
        self._admit(request)
        return request.future

    def classify(self, texts: list[str], language: str | None = None) -> Future:
        """Sentiment of `texts`: future of list[TaskResult]."""
        return self.run_task(SENTIMENT, texts, language)

    def chat(self, messages: list[ChatMessage], params: SamplingParams = SamplingParams(),
             timeout_s: float | None = None, fmt: ReplyFormat = ReplyFormat()) -> ChatHandle:
        handle = ChatHandle(list(messages), params, time.monotonic() + timeout_s if timeout_s else None, fmt)
        self._admit(handle)
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
                for request in [*self._inbox, *self._open]:
                    request.cancel()
            self._cond.notify()
        end = time.monotonic() + timeout
        while drain and self.busy and time.monotonic() < end:
            time.sleep(0.05)
        finished = not self.busy
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=max(0.1, end - time.monotonic()))
        return finished

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not self.busy:
                    self._cond.wait(timeout=1.0)
                    self._housekeeping()
                if not self._running:
                    break
                inbox, self._inbox = list(self._inbox), deque()
            for request in inbox:
                self._build(request)
            try:
                self.engine.step()
            except Exception:  # the batcher fails jobs itself; this is a bug: keep serving
                log.exception("engine step failed")
            self._open = [r for r in self._open if not self._finished(r)]
            self._housekeeping()
        self._shut_down()

    def _shut_down(self) -> None:
        """Not drained in time: end running replies cleanly (cancelled), fail the rest."""
        for request in self._open:
            request.cancel()
        try:
            self.engine.step()
        except Exception:
            log.exception("engine step failed")
        self.engine.batcher.cancel_all(SchedulerStopped("shutting down"))
        for request in self._inbox:
            if isinstance(request, ChatHandle):
                request._emit(SchedulerStopped("shutting down"))
            elif not request.future.done():
                request.future.set_exception(SchedulerStopped("shutting down"))

    def _finished(self, request: TaskRequest | ChatHandle) -> bool:
        if isinstance(request, ChatHandle):
            return request.job is None or request.job.released
        return request.future.done()

    def _build(self, request: TaskRequest | ChatHandle) -> None:
        """Turn a request into jobs; errors (bad input, prompt too long) go to the client."""
        try:
            if isinstance(request, ChatHandle):
                if request.cancelled:
                    request.stats.finish_reason = "cancelled"
                    request._emit(_DONE)
                    return
                job = self.engine.chat_job(request.messages, request.params, request.stats, request._emit,
                                           request._ended, request.fmt)
                job.deadline = request.deadline
                request.job = job
                jobs: list = [job]
            else:
                request.jobs = self.engine.task_jobs(request.task, request.texts, request.language)
                request.left = len(request.jobs)
                if not request.jobs:
                    request.future.set_result([])
                    return
                for task_job in request.jobs:
                    task_job.on_done = request._ended
                jobs = list(request.jobs)
                if request.future.cancelled():
                    request.cancel()
        except Exception as exc:
            if isinstance(request, ChatHandle):
                request.error = exc
                request.stats.finish_reason = "error"
                request._emit(exc)
            elif not request.future.done():
                request.future.set_exception(exc)
            return
        self._open.append(request)
        for job in jobs:
            self.engine.submit(job)

    def _housekeeping(self) -> None:
        if self.on_idle_step is not None:
            try:
                self.on_idle_step()
            except Exception:  # never let a monitor kill the worker
                log.exception("housekeeping failed")


__all__ = ["ChatHandle", "QueueFull", "Scheduler", "SchedulerStopped", "TaskResult"]
