"""`qwen-edge eval chat`: how the free-text replies read, measured by heuristics.

Each case (tests/data/chat_eval/cases.jsonl) lists a conversation's user turns; the engine answers
each one the way `/v1/respond` and `qwen-edge chat` do (persona by language, emotion hints when
chat.emotion_hints is on), and its reply goes back into the history before the next turn. Every
reply is scored:

- **language**: the reply is in the user's language (the case's `lang`). Code (fenced blocks,
  `inline`) and URLs are removed first; then the share of CJK ideographs among letters (the
  characters `str.isalpha` accepts, the count `detect_language` uses) must lie in
  LANGUAGE_SHARE[lang]: at least 0.2 for Chinese (detect_language's own threshold, which leaves
  room for English product names and commands in a Chinese reply), at most 0.05 for English (one
  quoted Chinese name or word, not a Chinese sentence). A reply without letters is not in any
  language.
- **refusal**: a pattern of REFUSALS matches anywhere in the reply (every language's patterns, so a
  Chinese refusal to an English user counts). The patterns say "I can't/won't help, provide,
  answer…", "sorry, but I cannot…", "as an AI I cannot…"; sympathy ("I'm sorry to hear that")
  and inability to feel ("I can't imagine") are not refusals. Every turn of the set is an
  ordinary request, so every match counts against the model.
- **verbatim**: the reply repeats a clause of the user's (any user turn so far) word for word: a
  clause (text between punctuation marks: sentence ends, commas, colons) of at least
  MIN_VERBATIM_UNITS[lang] units occurs in the reply as a contiguous run of units. Units are CJK
  ideographs and Latin words/numbers after NFKC and case folding, so spaces, punctuation and case
  do not hide a copy. 10 ideographs carry about as much as 6 English words;
  shorter clauses ("太开心了！", "Thank you!") are what a natural reply may well say too.
  Quoting the user's words at that length is what the issue calls parroting; a reflection that
  restates them ("you finally passed your test") changes the pronouns and is not counted.
- **near-verbatim**: at least NEAR_VERBATIM of the user message's unit NGRAM-grams (4 units: about
  two English words short of a clause, or a short Chinese phrase) occur in the reply, for messages
  of at least NGRAM + MIN_NGRAMS - 1 units: most of the message said back, even when reworded at
  its edges. Reported, but not the 0-parroting target, since reflecting a complaint's words is
  sometimes what an empathetic reply does.
- **empty**: no text but whitespace. **truncated**: the reply hit max_tokens (finish_reason
  "length").
- **length**: characters of the reply (median). **TTFT** and **tokens/s**: the engine's own
  ChatStats (median), meaningful only on an otherwise idle machine.

Runs are repeatable: one seed for every reply (`--seed`, default 0), one conversation at a time.
"""
from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.engine.engine import Engine
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.evaluation.datasets import SPLITS, DatasetError, in_tune_split, read_jsonl
from edge.evaluation.metrics import percentiles

Progress = Callable[[int, int], None]

LANGUAGES = ("zh", "en")
# (lowest, highest) share of CJK ideographs among the letters of a reply in that language
LANGUAGE_SHARE: dict[str, tuple[float, float]] = {"zh": (0.2, 1.0), "en": (0.0, 0.05)}
CJK = "\u3400-\u4dbf\u4e00-\u9fff"  # the ranges detect_language counts
CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`|https?://\S+", re.S)

_CANT_EN = r"(?:can(?:no|')?t|am unable to|'m unable to|am not able to|'m not able to|won't|will not)"
_CANT_ZH = r"(?:无法|不能|没办法|没有办法|不可以|不会)"
REFUSALS: dict[str, tuple[str, ...]] = {
    "en": (
        rf"\b(?:i'?m|i am) (?:very |really |so )?sorry,? but i {_CANT_EN}",
        rf"\bi {_CANT_EN} (?:help(?! but)|assist|provide|answer|give|offer|fulfil|comply|respond|"
        r"do that|support you with|engage|discuss|share)\b",
        rf"\bas an ai(?: language model| assistant| model)?,? i {_CANT_EN}",
        r"\bi (?:must|have to|need to) (?:decline|refuse)\b",
        r"\b(?:that|this) (?:is|isn't) (?:not )?something i can (?:help|assist) with",
        r"\bi(?:'m| am) not (?:allowed|permitted|authorized) to\b",
        r"\bi (?:don't|do not) have (?:access to|the ability to provide) (?:that|this|such) information",
    ),
    "zh": (
        rf"(?:对不起|抱歉|很抱歉|非常抱歉|不好意思)[，,。！!\s]*(?:但是?)?我{_CANT_ZH}",
        rf"我{_CANT_ZH}(?:为你|为您|给你|给您|帮你|帮您|向你|向您)?(?:提供|回答|帮助|协助|满足|处理|完成|回应)",
        rf"作为(?:一个|一名)?(?:ai|人工智能|语言模型|ai助手|人工智能助手)[^。！？\n]{{0,12}}?{_CANT_ZH}",
        r"无法(?:提供|回答)(?:这个|该|此|这些|相关的?|你的|您的)?(?:信息|问题|内容|建议|请求)",
        r"(?:拒绝|不便)(?:回答|提供)",
    ),
}
_REFUSALS = [(lang, p, re.compile(p)) for lang, ps in REFUSALS.items() for p in ps]

MIN_VERBATIM_UNITS: dict[str, int] = {"zh": 10, "en": 6}
NGRAM = 4
MIN_NGRAMS = 4        # messages shorter than NGRAM + MIN_NGRAMS - 1 units are not scored for near-verbatim
NEAR_VERBATIM = 0.6   # share of the message's n-grams found in the reply
_UNIT = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")
_CLAUSE_END = re.compile(r"[.!?;:,。！？；：，、…\n]+")


# -- measures ------------------------------------------------------------------------------------

def cjk_share(text: str) -> float | None:
    """Share of CJK ideographs among the letters of `text` without code and URLs; None: no letters."""
    prose = CODE.sub(" ", text)
    letters = [ch for ch in prose if ch.isalpha()]
    if not letters:
        return None
    return sum(1 for ch in letters if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf") / len(letters)


def in_language(reply: str, lang: str) -> bool:
    share = cjk_share(reply)
    low, high = LANGUAGE_SHARE[lang]
    return share is not None and low <= share <= high


def refusal(reply: str) -> str | None:
    """The first refusal pattern the reply matches, or None."""
    text = _fold(reply)
    return next((p for _, p, rx in _REFUSALS if rx.search(text)), None)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").casefold()


def units(text: str) -> list[str]:
    """CJK ideographs and Latin words/numbers, NFKC-normalized and case-folded."""
    return _UNIT.findall(_fold(text))


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def verbatim(users: Sequence[str], reply: str, lang: str) -> str | None:
    """The first user clause (of MIN_VERBATIM_UNITS or more) the reply repeats word for word."""
    got = units(reply)
    for text in users:
        for clause in _CLAUSE_END.split(text):
            want = units(clause)
            if len(want) >= MIN_VERBATIM_UNITS[lang] and _contains(got, want):
                return clause.strip()
    return None


def _ngrams(seq: list[str]) -> set[tuple[str, ...]]:
    return {tuple(seq[i:i + NGRAM]) for i in range(len(seq) - NGRAM + 1)}


def overlap(user: str, reply: str) -> float | None:
    """Share of the user message's unit n-grams that occur in the reply; None: message too short."""
    want = _ngrams(units(user))
    if len(want) < MIN_NGRAMS:
        return None
    return len(want & _ngrams(units(reply))) / len(want)


# -- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    lang: str
    category: str
    turns: tuple[str, ...]


def in_split(case: Case, split: str) -> bool:
    """'tune': the ~30 % of conversations chosen by a hash of their id (datasets.in_tune_split), so
    the turns of a conversation stay together; 'heldout': the rest."""
    return split == "all" or in_tune_split(case.id) == (split == "tune")


def load_cases(path: Path | str, split: str = "all", limit: int | None = None) -> list[Case]:
    path = Path(path)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (use one of {SPLITS})")
    rows = read_jsonl(path, lambda raw: Case(raw["id"], raw["lang"], raw.get("category", ""), tuple(raw["turns"])),
                      '{"id", "lang", "turns": [...]}')
    cases = []
    for n, case in rows:
        if case.lang not in LANGUAGE_SHARE or not case.turns or not all(isinstance(t, str) and t.strip()
                                                                         for t in case.turns):
            raise DatasetError(f"{path}:{n}: lang must be one of {list(LANGUAGE_SHARE)} and turns non-empty texts")
        if in_split(case, split):
            cases.append(case)
    if not cases:
        raise DatasetError(f"{path}: no cases in split {split!r}")
    return cases[:limit] if limit else cases


# -- running -------------------------------------------------------------------------------------

@dataclass
class Turn:
    id: str
    turn: int
    lang: str
    category: str
    user: str
    reply: str
    finish: str
    tokens: int
    ttft_ms: float
    tps: float
    in_language: bool = False
    refusal: str | None = None
    verbatim: str | None = None
    overlap: float | None = None

    @property
    def near_verbatim(self) -> bool:
        return self.overlap is not None and self.overlap >= NEAR_VERBATIM


def score(turn: Turn, users: Sequence[str]) -> Turn:
    turn.in_language = in_language(turn.reply, turn.lang)
    turn.refusal = refusal(turn.reply)
    turn.verbatim = verbatim(users, turn.reply, turn.lang)
    turn.overlap = overlap(turn.user, turn.reply)
    return turn


def run_case(engine: Engine, case: Case, params: SamplingParams) -> list[Turn]:
    history: list[ChatMessage] = []
    out = []
    for i, text in enumerate(case.turns):
        history.append(ChatMessage("user", text))
        stats = ChatStats()
        reply = "".join(engine.chat_stream(engine.hinted(history), params, stats))
        history.append(ChatMessage("assistant", reply))
        turn = Turn(case.id, i + 1, case.lang, case.category, text, reply, stats.finish_reason,
                    stats.completion_tokens, stats.ttft_ms, stats.decode_tps)
        out.append(score(turn, case.turns[:i + 1]))
    return out


def _rate(count: int, n: int) -> float | None:
    return round(count / n, 4) if n else None


def summary(turns: Sequence[Turn]) -> dict[str, Any]:
    n = len(turns)
    counts = {"in_language": sum(t.in_language for t in turns),
              "refusals": sum(t.refusal is not None for t in turns),
              "verbatim": sum(t.verbatim is not None for t in turns),
              "near_verbatim": sum(t.near_verbatim for t in turns),
              "empty": sum(not t.reply.strip() for t in turns),
              "truncated": sum(t.finish == "length" for t in turns)}
    return {"n": n, **counts, **{f"{k}_rate": _rate(v, n) for k, v in counts.items()},
            "median_chars": statistics.median(len(t.reply) for t in turns) if turns else None,
            "ttft_p50_ms": percentiles([t.ttft_ms for t in turns])["p50_ms"],
            "tokens_per_s_p50": round(statistics.median(t.tps for t in turns), 2) if turns else None}


def report(turns: Sequence[Turn]) -> dict[str, Any]:
    def group(key: Callable[[Turn], str]) -> dict[str, dict]:
        return {k: summary([t for t in turns if key(t) == k]) for k in sorted({key(t) for t in turns})}
    return {"all": summary(turns), "by_language": group(lambda t: t.lang),
            "by_category": group(lambda t: t.category),
            "turns": [{**asdict(t), "near_verbatim": t.near_verbatim} for t in turns]}


def evaluate(engine: Engine, cases: Sequence[Case], params: SamplingParams,
             progress: Progress | None = None) -> dict[str, Any]:
    turns: list[Turn] = []
    for i, case in enumerate(cases):
        turns.extend(run_case(engine, case, params))
        if progress:
            progress(i + 1, len(cases))
    return report(turns)
