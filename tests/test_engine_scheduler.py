"""The scheduler: sentiment never waits behind a whole reply; queues are bounded."""
from __future__ import annotations

import threading
import time

import pytest

from edge.engine.scheduler import QueueFull, Scheduler, SchedulerStopped
from edge.engine.types import ChatMessage, SamplingParams


@pytest.fixture()
def scheduler(engine):
    s = Scheduler(engine, queue_size=4)
    s.start()
    yield s
    s.stop(drain=False, timeout=10)


def test_sentiment_is_answered_while_a_long_reply_is_still_streaming(engine, scheduler):
    handle = scheduler.chat([ChatMessage("user", "a long story please")],
                            SamplingParams(max_tokens=200, temperature=0.8, seed=1))
    first = handle.get(timeout=30)  # the reply has started
    assert isinstance(first, str)
    result = scheduler.classify(["quick sentiment"]).result(timeout=30)
    assert result[0].label in ("positive", "negative")
    assert scheduler.active_chats == 1 or handle.stats.completion_tokens < 200  # reply not forced to finish
    handle.cancel()
    rest = list(handle)
    assert handle.stats.finish_reason in ("cancelled", "stop")
    assert len(rest) < 200


def test_results_arrive_in_order_for_a_list(scheduler):
    texts = [f"text number {i}" for i in range(11)]
    out = scheduler.classify(texts).result(timeout=60)
    assert len(out) == len(texts)


def test_bad_input_fails_only_that_request(scheduler):
    with pytest.raises(ValueError, match="empty"):
        scheduler.classify([""]).result(timeout=30)
    assert scheduler.classify(["fine"]).result(timeout=30)[0].label


def test_full_queue_is_refused(engine):
    s = Scheduler(engine, queue_size=2)  # not started: nothing drains the queue
    s.classify(["a"])
    s.classify(["b"])
    with pytest.raises(QueueFull):
        s.classify(["c"])
    with pytest.raises(QueueFull):
        s.chat([ChatMessage("user", "x")])


def test_stop_drains_then_refuses(engine):
    s = Scheduler(engine, queue_size=8)
    s.start()
    fut = s.classify(["drain me"])
    handle = s.chat([ChatMessage("user", "hi")], SamplingParams(max_tokens=5, temperature=0))
    assert s.stop(drain=True, timeout=30)
    assert fut.result(timeout=1)[0].label
    list(handle)
    with pytest.raises(SchedulerStopped):
        s.classify(["late"])


def test_timeout_ends_a_reply(scheduler):
    handle = scheduler.chat([ChatMessage("user", "go on")], SamplingParams(max_tokens=500, temperature=0.8, seed=2),
                            timeout_s=0.05)
    list(handle)
    assert handle.stats.finish_reason in ("timeout", "stop")


def test_many_concurrent_clients(scheduler):
    errors = []

    def client(i: int) -> None:
        try:
            if i % 2:
                list(scheduler.chat([ChatMessage("user", f"client {i}")], SamplingParams(max_tokens=4, temperature=0)))
            else:
                scheduler.classify([f"client {i}"]).result(timeout=60)
        except QueueFull:
            pass
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    deadline = time.monotonic() + 10
    while scheduler.active_chats and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.active_chats == 0


@pytest.mark.timeout(60)
def test_a_waiting_stream_holds_no_worker_thread_and_wakes_per_piece(monkeypatch):
    """ChatStream waits on the event loop and the engine thread wakes it per piece: no thread of
    the pool is parked per open stream (the pool has 40, shared), and with the client check
    an hour apart the pieces still arrive as they are emitted."""
    import asyncio

    import anyio

    from edge.api import streaming
    from edge.engine.scheduler import ChatHandle
    monkeypatch.setattr(streaming, "POLL_S", 3600.0)
    handle = ChatHandle([ChatMessage("user", "hi")], SamplingParams(), None)

    def engine_thread() -> None:
        for piece in ("Hel", "lo", "!"):
            time.sleep(0.05)
            handle._emit(piece)
        handle._emit(ChatHandle.END)

    async def main() -> tuple[str, int]:
        task = asyncio.create_task(streaming.ChatStream(handle).text())
        await asyncio.sleep(0.02)
        borrowed = anyio.to_thread.current_default_thread_limiter().borrowed_tokens
        threading.Thread(target=engine_thread).start()
        return await task, borrowed

    text, borrowed = asyncio.run(main())
    assert (text, borrowed) == ("Hello!", 0)


@pytest.mark.timeout(60)
def test_the_engine_thread_hands_loop_wakes_to_the_waker_thread_which_ends_with_its_loop(monkeypatch):
    """The engine thread must not write to the loop's self-pipe itself (that system call gives
    up the GIL, and the loop thread it wakes then holds the engine back): the loop's waker thread
    does it. Its thread ends once the loop has closed."""
    import asyncio

    from edge.api import streaming
    from edge.engine.scheduler import ChatHandle
    handle = ChatHandle([ChatMessage("user", "hi")], SamplingParams(), None)
    wakers: list[str] = []

    def engine_thread() -> None:
        for piece in ("a", "b", "c"):
            time.sleep(0.02)
            handle._emit(piece)
        handle._emit(ChatHandle.END)

    async def main() -> tuple[str, threading.Thread]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def spy(*args, **kwargs):
            wakers.append(threading.current_thread().name)
            return real(*args, **kwargs)
        monkeypatch.setattr(loop, "call_soon_threadsafe", spy)
        task = asyncio.create_task(streaming.ChatStream(handle).text())
        await asyncio.sleep(0.02)
        threading.Thread(target=engine_thread, name="engine").start()
        return await task, streaming.loop_waker().thread

    text, waker = asyncio.run(main())
    assert text == "abc"
    assert wakers and set(wakers) == {"loop-waker"}
    waker.join(timeout=5)
    assert not waker.is_alive()
