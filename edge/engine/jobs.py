"""What the batched engine runs: jobs, each owning one KV sequence while it runs.

A job is a small state machine driven by the batcher (batcher.py):
- `start()` is called each step until it returns True: the job takes what it needs (a sequence, a
  cached prefix, possibly waiting for the prefix to be evaluated);
- then its `pending` tokens are evaluated from `pos`, chunked over steps as the batcher decides;
  once the last one is in, the batcher calls `feed(logits)` with that token's logits;
- `feed` either ends the job (`done`) or sets the next `pending` token (`generating`: one token a
  step, next to every other job's);
- `release()` gives everything back, once, whatever ended the job (done, failure, cancellation).
"""
from __future__ import annotations

import time

import numpy as np

from edge.engine.prefixes import Prefix, PrefixCache


class Job:
    """Base class; subclasses implement start, feed and release."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self.pos = 0
        self.pending: list[int] = []
        self.generating = False
        self.done = False
        self.error: BaseException | None = None
        self.created = time.monotonic()
        self.deadline: float | None = None
        self.needs_logits = True  # feed() wants the logits of the last pending token
        self.released = False     # the batcher has ended it and given its resources back

    @property
    def cancelled(self) -> bool:
        return False

    def start(self) -> bool:
        raise NotImplementedError

    def feed(self, logits: np.ndarray) -> None:
        raise NotImplementedError

    def advance(self, n: int) -> None:
        """`n` pending tokens were evaluated."""
        del self.pending[:n]
        self.pos += n

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done = True

    def stop(self, now: float) -> None:
        """Cancelled, or past its deadline: end now (subclasses record which)."""
        self.done = True

    def release(self) -> None:
        """Give back the sequence and anything else held; called once, when the job has ended."""

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class PrefixJob(Job):
    """Evaluates a cached prefix into its own sequence (no logits needed)."""

    def __init__(self, prefix: Prefix, cache: PrefixCache) -> None:
        super().__init__()
        self.prefix, self.cache = prefix, cache
        self.seq = prefix.seq
        self.pending = list(prefix.tokens)
        self.needs_logits = False

    def start(self) -> bool:
        return True

    def advance(self, n: int) -> None:
        super().advance(n)
        if not self.pending:
            self.prefix.ready, self.prefix.evaluating = True, False
            self.done = True

    def feed(self, logits: np.ndarray) -> None:  # never asked for logits
        pass

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.prefix.evaluating = False
        self.prefix.failed = exc
        self.cache.evict(self.prefix)
