"""Watch the daemon's memory while it runs: shed caches above the soft limit, refuse work above the hard one.

A daemon thread samples every ``sample_interval_s``. States are judged on RSS against the effective
budget (the setting, or the cgroup limit when lower):

    ok ──(rss ≥ soft)──▶ soft ──(rss ≥ hard)──▶ hard
     ◀──(rss < soft)───      ◀──(rss < hard)───

Entering soft or hard runs the registered shed callbacks (the engine drops idle chat sessions and
caches). ``accepting_work`` is False only in hard; the API answers 503 then.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from edge.model.memory import effective_budget_bytes
from edge.settings import MemorySettings

log = logging.getLogger(__name__)


class MemoryState(str, Enum):
    OK = "ok"
    SOFT = "soft"
    HARD = "hard"


@dataclass(frozen=True)
class MemorySample:
    rss_bytes: int
    uss_bytes: int | None = None
    pss_bytes: int | None = None
    system_available_bytes: int | None = None
    system_total_bytes: int | None = None


Reader = Callable[[], MemorySample]
ShedCallback = Callable[[MemoryState], None]


def read_process_memory() -> MemorySample:
    """RSS (cheap) plus USS/PSS (a walk of /proc/self/smaps; skipped where not permitted)."""
    import psutil

    proc = psutil.Process()
    rss = proc.memory_info().rss
    uss = pss = None
    try:
        full = proc.memory_full_info()
        uss, pss = getattr(full, "uss", None), getattr(full, "pss", None)
    except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
        pass
    vm = psutil.virtual_memory()
    return MemorySample(rss, uss, pss, vm.available, vm.total)


class MemoryGuard:
    def __init__(self, settings: MemorySettings, reader: Reader = read_process_memory,
                 budget_bytes: int | None = None) -> None:
        self.settings = settings
        self.budget_bytes = budget_bytes if budget_bytes is not None else effective_budget_bytes(settings.budget_mb)
        self.soft_bytes = int(self.budget_bytes * settings.soft_fraction)
        self.hard_bytes = int(self.budget_bytes * settings.hard_fraction)
        self._reader = reader
        self._callbacks: list[tuple[str, ShedCallback]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = MemoryState.OK
        self.last: MemorySample | None = None
        self.peak_rss_bytes = 0
        self.samples = 0
        self.sheds = 0
        self.refusing_since: float | None = None

    # -- callbacks ------------------------------------------------------------------------------
    def on_pressure(self, name: str, callback: ShedCallback) -> None:
        """Register ``callback(state)``, run when memory crosses into soft or hard."""
        with self._lock:
            self._callbacks.append((name, callback))

    @property
    def accepting_work(self) -> bool:
        return self.state is not MemoryState.HARD

    # -- sampling -------------------------------------------------------------------------------
    def classify(self, rss_bytes: int) -> MemoryState:
        if rss_bytes >= self.hard_bytes:
            return MemoryState.HARD
        if rss_bytes >= self.soft_bytes:
            return MemoryState.SOFT
        return MemoryState.OK

    def sample_once(self) -> MemoryState:
        """Take one sample, update the state and run shed callbacks on the way up; returns the state."""
        try:
            sample = self._reader()
        except Exception:  # a failing reader must not kill the guard (nor leave it refusing work)
            log.exception("memory sample failed")
            return self.state
        previous = self.state
        new = self.classify(sample.rss_bytes)
        with self._lock:
            self.last, self.state = sample, new
            self.samples += 1
            self.peak_rss_bytes = max(self.peak_rss_bytes, sample.rss_bytes)
            callbacks = list(self._callbacks)
        if new is not previous:
            log.warning("memory %s -> %s: rss %.0f MiB of budget %.0f MiB", previous.value, new.value,
                        sample.rss_bytes / 2**20, self.budget_bytes / 2**20)
            self.refusing_since = time.time() if new is MemoryState.HARD else None
        if _rank(new) > _rank(previous):
            self._shed(new, callbacks)
        return new

    def _shed(self, state: MemoryState, callbacks: list[tuple[str, ShedCallback]]) -> None:
        self.sheds += 1
        for name, callback in callbacks:
            try:
                callback(state)
            except Exception:
                log.exception("memory shed callback %s failed", name)

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sample_interval_s):
            self.sample_once()

    # -- reporting ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Plain dict for /health and /metrics."""
        with self._lock:
            s = self.last
            return {
                "state": self.state.value,
                "accepting_work": self.accepting_work,
                "rss_bytes": s.rss_bytes if s else None,
                "uss_bytes": s.uss_bytes if s else None,
                "pss_bytes": s.pss_bytes if s else None,
                "peak_rss_bytes": self.peak_rss_bytes,
                "system_available_bytes": s.system_available_bytes if s else None,
                "system_total_bytes": s.system_total_bytes if s else None,
                "budget_bytes": self.budget_bytes,
                "soft_limit_bytes": self.soft_bytes,
                "hard_limit_bytes": self.hard_bytes,
                "samples": self.samples,
                "sheds": self.sheds,
            }


def _rank(state: MemoryState) -> int:
    return (MemoryState.OK, MemoryState.SOFT, MemoryState.HARD).index(state)
