"""Cached instruction prefixes: evaluated once, kept in the KV cache while they fit, saved when not.

Every task language, every chat persona and every long client system prompt (Home Assistant's) is a
prefix: tokens evaluated into a KV sequence of its own, which requests share with `seq_cp` (no copy,
no recomputation). Resident prefixes may hold at most `budget_tokens` KV cells and `len(seq_ids)`
sequences together. When a prefix must make room, the least recently used one that no request is
reading is evicted: its KV state is written once to a file (llama.cpp's per-sequence state) and read
back on its next use, which costs a small fraction of evaluating it again (BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from edge.engine.runtime import LlamaRuntime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Prefix:
    key: Hashable
    tokens: list[int]
    seq: int | None = None        # its KV sequence while resident
    ready: bool = False           # resident and evaluated
    evaluating: bool = False      # an evaluation job is running
    readers: int = 0              # requests copying from it right now (it cannot be evicted)
    saved: Path | None = None     # its KV state on disk, once evicted
    failed: BaseException | None = None  # why its last evaluation failed (told to one waiting request)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class PrefixStats:
    evaluated: int = 0
    restored: int = 0
    saved: int = 0
    evictions: int = 0
    restore_ms: float = 0.0
    save_ms: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)



def _seq(prefix: Prefix) -> int:
    assert prefix.seq is not None, "a resident prefix holds a sequence"
    return prefix.seq

class PrefixCache:
    """Prefixes by key; `ensure` makes one resident (restoring it, or asking for its evaluation)."""

    def __init__(self, rt: LlamaRuntime, seq_ids: list[int], budget_tokens: int, state_dir: Path | None,
                 model_key: str = "") -> None:
        self.rt = rt
        self.free = list(seq_ids)
        self.budget_tokens = budget_tokens
        self.state_dir = state_dir
        self.model_key = model_key
        self.entries: dict[Hashable, Prefix] = {}
        self.stats = PrefixStats()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)  # states of another run may not fit this model
            state_dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: Hashable, tokens: list[int]) -> Prefix:
        """The prefix for `key`; a new one (not resident) when unknown or when its tokens changed."""
        prefix = self.entries.get(key)
        if prefix is None or prefix.tokens != tokens:
            if prefix is not None:
                self.forget(prefix)
            prefix = self.entries[key] = Prefix(key, list(tokens))
        return prefix

    def find(self, key: Hashable) -> Prefix | None:
        return self.entries.get(key)

    def resident_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.entries.values() if p.seq is not None)

    def ensure(self, prefix: Prefix, evaluate: Callable[[Prefix], None] | None) -> bool:
        """True when `prefix` is resident and evaluated. Otherwise make room, restore its saved
        state or call `evaluate(prefix)` (which must set `ready` once done; None: only restore),
        and return False."""
        prefix.last_used = time.monotonic()
        if prefix.failed is not None:
            failed, prefix.failed = prefix.failed, None
            raise failed
        if prefix.ready or prefix.evaluating:
            return prefix.ready
        if prefix.seq is None and not self._make_room(prefix):
            return False  # every resident prefix is being read: try again next step
        if prefix.saved is not None and self._restore(prefix):
            return True
        if evaluate is None:  # nothing to restore and not to be evaluated here: give the room back
            self.free.append(_seq(prefix))
            prefix.seq = None
            return False
        prefix.evaluating = True
        self.stats.evaluated += 1
        evaluate(prefix)
        return False

    def adopt(self, key: Hashable, tokens: list[int], src_seq: int) -> Prefix | None:
        """Keep the first len(tokens) cells of `src_seq` as the prefix `key`, without evaluating
        anything (a conversation that began with a long system prompt); None when there is no room."""
        prefix = self.get(key, tokens)
        if prefix.ready:
            return prefix
        if prefix.seq is None and not self._make_room(prefix):
            if prefix.saved is None:
                self.entries.pop(key, None)
            return None
        self.rt.seq_cp_range(src_seq, _seq(prefix), 0, len(tokens))
        prefix.ready = True
        prefix.last_used = time.monotonic()
        return prefix

    def _make_room(self, prefix: Prefix) -> bool:
        while not self.free or self.resident_tokens() + len(prefix.tokens) > self.budget_tokens:
            victims = [p for p in self.entries.values() if p.seq is not None and p is not prefix
                       and p.readers == 0 and not p.evaluating]
            if not victims:
                if self.free and self.resident_tokens() == 0:
                    break  # one prefix larger than the budget may still live alone
                return False
            self.evict(min(victims, key=lambda p: p.last_used))
        prefix.seq = self.free.pop()
        self.rt.seq_rm(prefix.seq)
        return True

    def evict(self, prefix: Prefix) -> None:
        """Drop `prefix` from the KV cache, saving its state first (once) when a folder is set."""
        if prefix.seq is None:
            return
        if prefix.ready and prefix.saved is None and self.state_dir is not None:
            self._save(prefix)
        self.rt.seq_rm(prefix.seq)
        self.free.append(prefix.seq)
        prefix.seq, prefix.ready = None, False
        self.stats.evictions += 1

    def forget(self, prefix: Prefix) -> None:
        self.evict(prefix)
        if prefix.saved is not None:
            prefix.saved.unlink(missing_ok=True)
        self.entries.pop(prefix.key, None)

    def evict_idle(self) -> int:
        """Evict every prefix nobody is reading (memory pressure); how many were evicted."""
        idle = [p for p in self.entries.values() if p.seq is not None and p.readers == 0 and not p.evaluating]
        for prefix in idle:
            self.evict(prefix)
        return len(idle)

    def clear(self) -> None:
        for prefix in list(self.entries.values()):
            self.forget(prefix)

    def _state_path(self, prefix: Prefix) -> Path:
        digest = hashlib.sha256(repr((self.model_key, self.rt.config.kv_cache_type, prefix.tokens)).encode())
        assert self.state_dir is not None
        return self.state_dir / f"{digest.hexdigest()[:32]}.kvseq"

    def _save(self, prefix: Prefix) -> None:
        t0 = time.perf_counter()
        path = self._state_path(prefix)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        try:
            tmp.write_bytes(self.rt.seq_state(_seq(prefix)))
            tmp.replace(path)
        except OSError as exc:  # a full disk costs a recomputation later, nothing else
            log.warning("could not save a prefix state to %s: %s", path, exc)
            tmp.unlink(missing_ok=True)
            return
        prefix.saved = path
        self.stats.saved += 1
        self.stats.save_ms += (time.perf_counter() - t0) * 1000

    def _restore(self, prefix: Prefix) -> bool:
        t0 = time.perf_counter()
        seq = _seq(prefix)
        try:
            data = prefix.saved.read_bytes() if prefix.saved else b""
        except OSError as exc:
            log.warning("could not read a saved prefix state: %s", exc)
            data = b""
        if not data or not self.rt.set_seq_state(seq, data) or self.rt.seq_len(seq) != len(prefix.tokens):
            self.rt.seq_rm(seq)
            prefix.saved = None
            return False
        prefix.ready = True
        self.stats.restored += 1
        self.stats.restore_ms += (time.perf_counter() - t0) * 1000
        return True
