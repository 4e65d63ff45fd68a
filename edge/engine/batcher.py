"""Continuous batching: every engine step is one llama_decode holding the next token of every reply
being generated and as many prompt tokens of waiting work as the step's budget allows.

Policy (what a step holds, in this order):
1. one token of every generating job (chat replies, JSON answers, label continuations): a running
   reply advances at every step, whatever else is waiting;
2. prompt tokens of waiting jobs (task texts, new chat prompts, prefixes), chunked: a long prompt
   never holds a step for long. While replies are generating, the prompt budget of a step is what
   keeps the steps' time within 1 / `reply_share` of steps without prompt tokens, over time: what
   a step leaves unspent is saved (up to `prompt_burst_s`) for a later step, so a new request's
   prompt goes through at once while a steady flood of classification work gets only its share
   (StepPlanner, from measured step times). Replies keep at least that share of their unloaded
   speed however much classification work arrives. With no reply generating, a step takes up to
   n_batch prompt tokens, the fastest way through a bulk of texts;
3. among waiting jobs, the shortest remaining prompt first, each second of waiting counting as
   AGING_TOKENS_PER_S tokens less: a short classification overtakes a long chat prompt, and a long
   prompt is never starved by a flood of short ones.
Sampling happens per job from its own logits row, right after the step (grammars included), so a
job's output does not depend on what else shares its step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edge.engine.jobs import Job
from edge.engine.runtime import KVCacheFull, LlamaRuntime

log = logging.getLogger(__name__)
AGING_TOKENS_PER_S = 256



def _seq(job: Job) -> int:
    assert job.seq is not None, "a started job holds a sequence"
    return job.seq

class ContextFull(KVCacheFull):
    """The KV cache has no room for this job, and nothing running will free any."""


class StepPlanner:
    """The prompt-token budget of a step while replies are generating, from measured step times.

    A step is modelled as t = decode_s + n_prompt * token_s. Each step with replies earns prompt
    work the time decode_s * (1 - reply_share) / reply_share; what a step does not spend is saved,
    up to `burst_s`, and a later step may spend it at once. So a request that arrives while replies
    stream gets its whole prompt evaluated in one step (its first token comes as soon as it would
    on an idle engine), the replies pause for at most `burst_s`, and sustained prompt work (a flood
    of classifications) gets no more than 1 - reply_share of the time: over any stretch of W
    seconds, replies keep at least reply_share * W - burst_s. With burst_s = 0 every step keeps
    within decode_s / reply_share. Steps without replies refill the saving: nobody was slowed."""

    def __init__(self, n_batch: int, reply_share: float = 0.5, burst_s: float = 0.0, min_prompt: int = 8,
                 smoothing: float = 0.2) -> None:
        self.n_batch = n_batch
        self.reply_share = reply_share
        self.burst_s = burst_s
        self.min_prompt = min_prompt
        self.smoothing = smoothing
        self.decode_s: float | None = None   # a step with decode tokens only
        self.token_s: float | None = None    # each prompt token added to it
        self.saved_s = burst_s               # prompt time earned by replies and not spent yet

    def _earned(self) -> float:
        assert self.decode_s is not None
        return self.decode_s * (1 - self.reply_share) / self.reply_share

    def prompt_budget(self, n_decode: int) -> int:
        room = self.n_batch - n_decode
        if n_decode == 0:
            return room
        if self.decode_s is None or self.token_s is None or self.token_s <= 0:
            return min(room, self.min_prompt)
        allowed = (self.saved_s + self._earned()) / self.token_s
        return max(self.min_prompt, min(room, int(allowed)))

    def record(self, n_decode: int, n_prompt: int, seconds: float) -> None:
        ema = lambda old, new: new if old is None else old + self.smoothing * (new - old)  # noqa: E731
        if n_prompt == 0 and n_decode:
            self.decode_s = ema(self.decode_s, seconds)
        elif n_prompt and n_decode and self.decode_s is not None:
            self.token_s = ema(self.token_s, max(0.0, seconds - self.decode_s) / n_prompt)
        elif n_prompt >= 32:  # a prompt-only step: a fair estimate of the per-token cost
            self.token_s = ema(self.token_s, seconds / n_prompt)
        if not n_decode:
            self.saved_s = self.burst_s
        elif self.decode_s is not None:
            spent = max(0.0, seconds - self.decode_s) if n_prompt else 0.0
            self.saved_s = max(0.0, min(self.burst_s, self.saved_s + self._earned() - spent))


class Batcher:
    """The jobs of one llama.cpp context, stepped together. Single-threaded: the engine lock."""

    def __init__(self, rt: LlamaRuntime, planner: StepPlanner, make_room: Callable[[], bool]) -> None:
        self.rt = rt
        self.planner = planner
        self.make_room = make_room  # evict idle conversations / prefixes; True when anything was freed
        self.jobs: list[Job] = []
        self._started: set[int] = set()
        self.steps = 0
        self.last_step: tuple[int, int] = (0, 0)  # (decode tokens, prompt tokens) of the last step
        self._hold_prompts = False  # the cache was full: decode only until a job ends

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def generating(self) -> int:
        return sum(1 for j in self.jobs if j.generating and not j.done)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one llama_decode over the jobs (or just start / end jobs); True while work is left."""
        self._end_cancelled()
        running = [j for j in self.jobs if not j.done and self._start(j)]
        decode = [j for j in running if j.generating and j.pending]
        waiting = sorted((j for j in running if not j.generating and j.pending), key=self._prompt_order)
        plan = self._plan(decode, waiting)
        if plan[0]:
            self._run(*plan)
        self._finish()
        return self.busy

    def _prompt_order(self, job: Job) -> float:
        return len(job.pending) - AGING_TOKENS_PER_S * (time.monotonic() - job.created)

    def _start(self, job: Job) -> bool:
        if id(job) in self._started:
            return True
        try:
            started = job.start()
        except Exception as exc:
            job.fail(exc)
            return False
        if started:
            self._started.add(id(job))
        return started

    def _plan(self, decode: list[Job], waiting: list[Job]) -> tuple[list, list[tuple[Job, int, int | None]]]:
        entries: list[tuple[int, int, int, bool]] = [(_seq(j), j.pending[0], j.pos, True) for j in decode]
        chunks: list[tuple[Job, int, int | None]] = [(j, 1, i) for i, j in enumerate(decode)]
        budget = 0 if self._hold_prompts and decode else min(self.planner.prompt_budget(len(decode)),
                                                             self.rt.n_batch - len(entries))
        for job in waiting:
            if budget <= 0:
                break
            n = min(budget, len(job.pending))
            last = n == len(job.pending) and job.needs_logits
            entries += [(_seq(job), tok, job.pos + i, last and i == n - 1) for i, tok in enumerate(job.pending[:n])]
            chunks.append((job, n, len(entries) - 1 if last else None))
            budget -= n
        return entries, chunks

    def _run(self, entries: list, chunks: list[tuple[Job, int, int | None]]) -> None:
        t0 = time.perf_counter()
        try:
            self.rt.decode_step(entries)
        except KVCacheFull:
            self._on_full(chunks)
            return
        except Exception as exc:  # llama.cpp failed the step: fail its jobs, keep the engine going
            log.error("decode step failed: %s", exc)
            for job, _, _ in chunks:
                job.fail(exc)
            return
        n_decode = sum(1 for job, _, _ in chunks if job.generating)
        self.planner.record(n_decode, len(entries) - n_decode, time.perf_counter() - t0)
        self.steps += 1
        self.last_step = (n_decode, len(entries) - n_decode)
        for job, n, row in chunks:
            job.advance(n)
            if row is None or job.done:
                continue
            try:
                job.feed(self.rt.logits(row))
            except Exception as exc:
                job.fail(exc)

    def _on_full(self, chunks: list[tuple[Job, int, int | None]]) -> None:
        """No KV room for the step: free idle cells and let the next step retry; when nothing can
        be freed, prompts wait for running replies to end, and with no reply running the newest
        prompt (or, with replies only, the longest reply) is failed."""
        if self.make_room():
            return
        prompts = [job for job, _, _ in chunks if not job.generating]
        if prompts and any(job.generating for job, _, _ in chunks):
            self._hold_prompts = True
            return
        victims = prompts or [job for job, _, _ in chunks]
        victim = max(victims, key=lambda j: j.created) if prompts else max(victims, key=lambda j: j.pos)
        victim.fail(ContextFull("the context is full: no room in the KV cache for this request"))

    def _end_cancelled(self) -> None:
        now = time.monotonic()
        for job in self.jobs:
            if not job.done and (job.cancelled or job.expired(now)):
                job.stop(now)

    def _finish(self) -> None:
        ended = [j for j in self.jobs if j.done]
        if not ended:
            return
        self.jobs = [j for j in self.jobs if not j.done]
        self._hold_prompts = False  # an ended job freed its cells
        for job in ended:
            self._started.discard(id(job))
            try:
                job.release()
            except Exception:
                log.exception("releasing a job failed")
            job.released = True

    def cancel_all(self, exc: BaseException) -> None:
        for job in self.jobs:
            if not job.done:
                job.fail(exc)
        self._finish()
