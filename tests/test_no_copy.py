"""No parroting: a text reply never repeats chat.no_copy_tokens tokens in a row of the user's prose."""
from __future__ import annotations

import pytest

from edge.engine.no_copy import CopyGuard, prose
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.settings import load_settings

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def _runs(tokens: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def test_the_token_that_would_complete_a_copied_run_is_banned():
    guard = CopyGuard([[1, 2, 3, 4], [2, 3, 9]], 3)
    assert guard.banned([7, 2, 3]) == [4, 9]   # both places where "2 3" is followed by something
    assert guard.banned([1, 2]) == [3]
    assert guard.banned([2]) == []             # too short to be a run yet
    assert guard.banned([3, 2]) == []          # not a run of the sources


def test_only_tokens_with_a_letter_are_banned():
    digits = {3, 4}  # a number is written digit by digit: cutting it would garble it ("300" -> "3,00")
    guard = CopyGuard([[1, 2, 3, 4, 5]], 3, bannable=lambda t: t not in digits)
    assert guard.banned([1, 2]) == [] and guard.banned([2, 3]) == []
    assert guard.banned([3, 4]) == [5]  # the word after the number is


def test_code_and_quotes_are_not_the_users_prose():
    text = 'Fix this: ```def f(x): return x``` and `g()`, then say "hello world" and 「你好」 back.'
    assert prose(text) == ["Fix this: ", " and ", ", then say ", " and ", " back."]


def test_settings_refuse_a_one_token_run():
    assert load_settings(None, chat={"no_copy_tokens": 0}).chat.no_copy_tokens == 0
    with pytest.raises(Exception, match="at least 2"):
        load_settings(None, chat={"no_copy_tokens": 1})


def _reply(engine, text: str, guard: CopyGuard | None = "default") -> list[int]:  # type: ignore[assignment]
    job = engine.chat_job([ChatMessage("user", text)], GREEDY, ChatStats(), lambda _p: None)
    if guard != "default":
        job.no_copy = guard
    engine.run([job])
    return job.generated


def test_a_reply_is_steered_off_a_run_it_would_have_copied(engine):
    """The tiny model's own greedy reply stands for the user's words: with a guard over it, the
    same prompt can no longer produce three of its tokens in a row."""
    free = _reply(engine, "tell me about the sea", guard=None)
    assert len(free) >= 6
    guarded = _reply(engine, "tell me about the sea", guard=CopyGuard([free], 3))
    assert guarded != free
    assert not _runs(guarded, 3) & _runs(free, 3)


def test_a_reply_job_guards_against_the_users_messages_by_default(engine):
    n = engine.chat.defaults.no_copy_tokens
    assert n >= 2
    history = [ChatMessage("user", "my old laptop keeps overheating every single afternoon"),
               ChatMessage("assistant", "That sounds annoying."),
               ChatMessage("user", 'it shows "thermal event 42" and then shuts down')]
    job = engine.chat_job(history, GREEDY, ChatStats(), lambda _p: None)
    expected = CopyGuard.of_messages([m.content for m in history if m.role == "user"], engine.rt.tokenize,
                                     engine.rt.piece, n)
    assert job.no_copy is not None and job.no_copy.follow == expected.follow and job.no_copy.follow
    quoted = engine.rt.tokenize("thermal event 42")
    assert not _runs(quoted, n - 1) & set(job.no_copy.follow)  # the quote may be repeated
    engine.run([job])
