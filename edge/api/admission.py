"""Admission: whether the daemon takes new work now, and the ways a request ends without an answer.

Every protocol refuses work the same way because `ServingState` asks `admit` (loading, failed,
memory pressure); errors.py maps these exceptions to HTTP statuses in one place.
"""
from __future__ import annotations

from typing import Protocol

from edge.engine.scheduler import Scheduler

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


def admit(status: str, error: str | None, scheduler: Scheduler | None, guard: MemoryMonitor | None) -> Scheduler:
    """The scheduler to hand new work to, or NotReady / MemoryPressure saying why not."""
    if status != "ready" or scheduler is None:
        raise NotReady(error or f"the model is {status}")
    if guard is not None and not guard.accepting_work:
        raise MemoryPressure("memory is above the hard limit; try again shortly")
    return scheduler
