"""Streamed replies on the event loop: `ChatStream` over a scheduler's ChatHandle, woken per piece
by the loop's `LoopWaker` thread, so an open stream holds no thread of its own."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from edge.api.access import add_chat_usage
from edge.api.admission import POLL_S, ClientGone
from edge.engine.scheduler import ChatHandle
from edge.engine.types import ChatStats

if TYPE_CHECKING:
    from fastapi import Request

log = logging.getLogger(__name__)


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
