"""Continuous batching: one llama_decode per step for every running job, fair to replies, same results."""
from __future__ import annotations

import threading

import pytest

from edge.engine.batcher import AGING_TOKENS_PER_S, StepPlanner
from edge.engine.scheduler import Scheduler
from edge.engine.types import ChatMessage, ChatStats, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = ["tell me about the sea", "我今天有点累", "what is a good breakfast?", "describe a cat"]


def _reply_alone(engine, text: str) -> str:
    return "".join(engine.chat_stream([ChatMessage("user", text)], GREEDY))


def test_replies_batched_together_equal_replies_generated_alone(engine):
    alone = [_reply_alone(engine, t) for t in PROMPTS]
    texts: list[list[str]] = [[] for _ in PROMPTS]
    jobs = [engine.chat_job([ChatMessage("user", t)], GREEDY, ChatStats(), texts[i].append)
            for i, t in enumerate(PROMPTS)]
    steps_before = engine.batcher.steps
    engine.run(jobs)
    assert ["".join(t) for t in texts] == alone
    # they really shared steps: far fewer steps than tokens generated one reply at a time
    generated = sum(len(j.generated) for j in jobs)
    assert engine.batcher.steps - steps_before < generated


def test_task_texts_share_a_step_and_match_one_by_one(engine):
    texts = ["good", "bad", "很好", "很差", "fine", "不错", "awful", "棒极了"]
    single = [engine.classify(t).label for t in texts]
    steps: list[int] = []  # task texts whose prompt each step held
    real = engine.batcher._plan

    def spy(decode, waiting):
        entries, chunks = real(decode, waiting)
        steps.append(sum(1 for j, _, _ in chunks if type(j).__name__ == "LabelJob" and not j.generating))
        return entries, chunks
    engine.batcher._plan = spy
    try:
        batched = engine.classify_many(texts)
    finally:
        engine.batcher._plan = real
    assert [r.label for r in batched] == single
    assert len(texts) in steps  # every text in one llama_decode


def test_a_flood_of_classifications_never_stalls_a_running_reply(engine):
    """Every step holds one token of each generating reply, and no more prompt tokens than the
    planner allows: however much classification work arrives, the reply advances at every step."""
    sched = Scheduler(engine, queue_size=64)
    seen: list[tuple[int, int, int]] = []   # (replies generating, their tokens in the step, prompt tokens)
    real = engine.batcher._plan

    def spy(decode, waiting):
        entries, chunks = real(decode, waiting)
        budget = engine.batcher.planner.prompt_budget(len(decode))
        prompt = len(entries) - len(decode)
        seen.append((len(decode), sum(1 for j, _, _ in chunks if j.generating), prompt))
        assert not decode or prompt <= max(budget, 0)
        return entries, chunks
    engine.batcher._plan = spy
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            sched.classify([f"text {i} 很好" for i in range(6)]).result(timeout=60)
    sched.start()
    try:
        workers = [threading.Thread(target=flood) for _ in range(3)]
        for w in workers:
            w.start()
        handle = sched.chat([ChatMessage("user", "a long answer please")], SamplingParams(max_tokens=40, temperature=0))
        pieces = list(handle)
        stop.set()
        for w in workers:
            w.join(timeout=60)
    finally:
        engine.batcher._plan = real
        sched.stop(drain=False, timeout=10)
    mixed = [s for s in seen if s[0] and s[2]]
    assert mixed, "classification work never shared a step with the reply"
    assert all(gen == n for n, gen, _ in seen if n)  # each generating reply had its token in every step
    assert handle.stats.completion_tokens == len([p for p in pieces]) or handle.stats.completion_tokens >= 1


def test_planner_keeps_a_step_within_the_reply_share():
    planner = StepPlanner(n_batch=512, reply_share=0.5, min_prompt=4)
    decode_s, token_s = 0.030, 0.004
    for _ in range(20):  # learn the machine: decode-only steps, then mixed ones
        planner.record(2, 0, decode_s)
        planner.record(2, 30, decode_s + 30 * token_s)
    budget = planner.prompt_budget(2)
    assert decode_s + budget * token_s <= decode_s / 0.5 * 1.01
    assert budget >= 4
    assert planner.prompt_budget(0) == 512  # nothing generating: a full batch of prompt tokens
    slow = StepPlanner(n_batch=512, reply_share=0.9, min_prompt=4)
    for _ in range(20):
        slow.record(2, 0, decode_s)
        slow.record(2, 30, decode_s + 30 * token_s)
    assert slow.prompt_budget(2) < budget  # a larger reply share leaves fewer prompt tokens


def _learned(planner: StepPlanner, decode_s: float, token_s: float) -> StepPlanner:
    for _ in range(20):  # decode-only steps, then mixed ones
        planner.record(2, 0, decode_s)
        planner.record(2, 10, decode_s + 10 * token_s)
    return planner


def test_a_new_prompt_goes_through_at_once_and_a_flood_still_gets_only_its_share():
    decode_s, token_s, share, burst_s = 0.030, 0.002, 0.5, 0.6
    steady = _learned(StepPlanner(n_batch=512, reply_share=share, min_prompt=4), decode_s, token_s)
    planner = _learned(StepPlanner(n_batch=512, reply_share=share, burst_s=burst_s, min_prompt=4), decode_s, token_s)
    for _ in range(40):  # replies alone for a while: the saving fills up to burst_s
        planner.record(2, 0, decode_s)
    # a 250-token chat prompt arrives: one step takes it whole, not ~15 steps of 15 tokens
    assert steady.prompt_budget(2) < 20
    assert planner.prompt_budget(2) >= 250
    # a flood: every step takes its whole budget, for 60 simulated seconds
    replies_s = prompts_s = 0.0
    while replies_s + prompts_s < 60:
        n = planner.prompt_budget(2)
        planner.record(2, n, decode_s + n * token_s)
        replies_s, prompts_s = replies_s + decode_s, prompts_s + n * token_s
    assert replies_s >= share * (replies_s + prompts_s) - burst_s
    assert planner.prompt_budget(2) < 20  # the saving is spent: back to the per-step share


def test_a_long_prompt_is_not_starved_by_short_ones(engine):
    """Shortest first, but waiting counts: a prompt waiting AGING seconds overtakes fresh short ones."""
    from edge.engine.jobs import Job

    class Waiting(Job):
        def __init__(self, n: int, age: float) -> None:
            super().__init__()
            self.pending = [0] * n
            self.created -= age
    long_old = Waiting(1000, 1000 / AGING_TOKENS_PER_S + 1)
    short_new = Waiting(20, 0)
    order = sorted([short_new, long_old], key=engine.batcher._prompt_order)
    assert order[0] is long_old
    assert sorted([Waiting(1000, 0), short_new], key=engine.batcher._prompt_order)[0] is short_new


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_cancelled_reply_frees_its_slot_between_steps(engine, n_jobs):
    jobs = [engine.chat_job([ChatMessage("user", f"cancel me {i}")], SamplingParams(max_tokens=50, temperature=0),
                            ChatStats(), lambda _p: None) for i in range(n_jobs)]
    for job in jobs:
        engine.submit(job)
    engine.step()
    engine.step()
    for job in jobs:
        job.cancel_requested = True
    engine.step()
    assert all(job.done for job in jobs) and not engine.batcher.jobs
    assert all(not slot.busy for slot in engine.chat.slots)
    assert all(job.stats.finish_reason == "cancelled" for job in jobs)
