"""MemoryGuard state machine, driven by an injected reader (no real memory pressure needed)."""
from __future__ import annotations

import threading
import time

from edge.daemon.memory_guard import MemoryGuard, MemorySample, MemoryState, read_process_memory
from edge.settings import MemorySettings

MIB = 1 << 20


class ScriptedReader:
    def __init__(self, values_mib: list[int]) -> None:
        self.values = list(values_mib)
        self.calls = 0

    def __call__(self) -> MemorySample:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return MemorySample(rss_bytes=value * MIB, uss_bytes=value * MIB - 1, pss_bytes=value * MIB,
                            system_available_bytes=4096 * MIB, system_total_bytes=8192 * MIB)


def make_guard(values, interval=0.01):
    settings = MemorySettings(budget_mb=1000, soft_fraction=0.9, hard_fraction=0.97, sample_interval_s=interval)
    return MemoryGuard(settings, reader=ScriptedReader(values), budget_bytes=1000 * MIB)


def test_states_and_callbacks():
    guard = make_guard([500, 899, 900, 950, 970, 990, 960, 899, 500, 980])
    seen = []
    guard.on_pressure("drop-idle", lambda state: seen.append(state))
    states = [guard.sample_once() for _ in range(10)]
    assert [s.value for s in states] == ["ok", "ok", "soft", "soft", "hard", "hard", "soft", "ok", "ok", "hard"]
    # callbacks run on each crossing upwards: ok->soft, soft->hard, ok->hard
    assert seen == [MemoryState.SOFT, MemoryState.HARD, MemoryState.HARD]
    assert guard.sheds == 3


def test_accepting_work_follows_hard_limit():
    guard = make_guard([980, 960, 999])
    guard.sample_once()
    assert not guard.accepting_work
    guard.sample_once()
    assert guard.accepting_work and guard.state is MemoryState.SOFT
    guard.sample_once()
    assert not guard.accepting_work


def test_snapshot_reports_everything():
    guard = make_guard([100, 950, 300])
    for _ in range(3):
        guard.sample_once()
    snap = guard.snapshot()
    assert snap["state"] == "ok" and snap["accepting_work"] is True
    assert snap["rss_bytes"] == 300 * MIB and snap["peak_rss_bytes"] == 950 * MIB
    assert snap["budget_bytes"] == 1000 * MIB and snap["soft_limit_bytes"] == 900 * MIB
    assert snap["hard_limit_bytes"] == 970 * MIB and snap["samples"] == 3
    assert snap["system_available_bytes"] == 4096 * MIB and snap["uss_bytes"] == 300 * MIB - 1


def test_failing_reader_and_callback_do_not_break_the_guard():
    calls = {"n": 0}

    def flaky() -> MemorySample:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("proc unavailable")
        return MemorySample(990 * MIB)

    guard = MemoryGuard(MemorySettings(budget_mb=1000), reader=flaky, budget_bytes=1000 * MIB)
    guard.on_pressure("broken", lambda state: 1 / 0)
    assert guard.sample_once() is MemoryState.HARD
    assert guard.sample_once() is MemoryState.HARD     # reader failed: state kept
    assert guard.samples == 1


def test_thread_samples_and_stops():
    guard = make_guard([100, 100, 950])
    crossed = threading.Event()
    guard.on_pressure("event", lambda state: crossed.set())
    guard.start()
    try:
        assert crossed.wait(5), "guard thread never sampled the soft crossing"
        assert guard.state is MemoryState.SOFT
    finally:
        guard.stop()
    n = guard.samples
    time.sleep(0.05)
    assert guard.samples == n                          # stopped


def test_real_reader_reads_this_process():
    sample = read_process_memory()
    assert 10 * MIB < sample.rss_bytes < 4096 * MIB
    assert sample.system_total_bytes and sample.system_available_bytes
