"""Grammar-constrained tasks over cached instruction prefixes, as jobs of the batched engine.

Per (task, language) the system prompt + few-shot turns + the opening of the user turn form a
prefix, evaluated once (prefixes.py). A request copies it into a work sequence (llama.cpp shares the
cells), evaluates only its own text and the turn's closing tokens, and reads the answer:
- label tasks: the grammar is applied to the whole vocabulary once at start-up, which gives the
  tokens it allows first; a request takes the best-scoring of those (the grammar sampler's greedy
  choice) and, when that token already decides the label (the usual case), stops there. Otherwise
  it continues token by token under the grammar. `reference=True` runs the plain grammar sampler
  from the first token; tests check both agree.
- JSON tasks: greedy decoding under the grammar derived from the task's schema, token by token.
Start-up checks (grammar vs label set, few-shot answers vs grammar) refuse a task with a message
naming its file.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.engine.chat_template import ChatTemplate
from edge.engine.grammar import Grammar, GrammarError
from edge.engine.jobs import Job
from edge.engine.prefixes import Prefix, PrefixCache
from edge.engine.runtime import LlamaRuntime
from edge.engine.tasks import PromptError, TaskLanguage, TaskSpec, pick_language
from edge.engine.types import ChatMessage

MAX_LABEL_TOKENS = 16
_SENTINEL = "\ue0ffTEXT\ue0ff"  # never produced by tokenizing user text


class InputError(ValueError):
    """The request's text cannot be processed (empty, unknown language...)."""


class OutputLimit(RuntimeError):
    """A JSON answer reached the task's max_output_tokens before the grammar completed it."""


@dataclass(frozen=True)
class TaskResult:
    task: str
    language: str          # which prompt language was used
    n_tokens: int          # tokens of the text after truncation
    truncated: bool        # the text was longer than the task's max_text_tokens (head and tail kept)
    latency_ms: float
    label: str | None = None        # label tasks: the canonical id from labels.toml
    display: str | None = None      # label tasks: the label as the model wrote it, e.g. "正面"
    probability: float | None = None  # label tasks: softmax over the labels' scores
    output: Any = None              # JSON tasks: the parsed answer

    def to_dict(self) -> dict:
        head = ({"label": self.label, "display": self.display, "probability": self.probability}
                if self.label is not None else {"output": self.output})
        return {**head, "language": self.language, "n_tokens": self.n_tokens, "truncated": self.truncated,
                "latency_ms": self.latency_ms}


SentimentResult = TaskResult  # what /v1/sentiment and the chat's sentiment line get


@dataclass
class Resources:
    """What task jobs take from the engine: the runtime, the prefix cache, work sequences."""
    rt: LlamaRuntime
    prefixes: PrefixCache
    work_seqs: list[int]
    evaluate_prefix: Callable[[Prefix], None]


@dataclass
class CompiledLanguage:
    task: str
    spec: TaskLanguage
    prefix: list[int]
    suffix: list[int]
    grammar: Grammar
    first_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    first_labels: list[tuple[str, ...]] = field(default_factory=list)  # per first token: labels it can start
    label_ids: list[str] = field(default_factory=list)
    label_rows: list[np.ndarray] = field(default_factory=list)         # per label: indexes into first_ids

    @property
    def prefix_key(self) -> tuple[str, str, str]:
        return ("task", self.task, self.spec.language)


def _prefix_suffix(template: ChatTemplate, spec: TaskLanguage) -> tuple[list[int], list[int]]:
    msgs = [ChatMessage("system", spec.system)]
    for text, answer in spec.examples:
        msgs += [ChatMessage("user", text), ChatMessage("assistant", answer)]
    msgs.append(ChatMessage("user", _SENTINEL))
    segs = template.segments(msgs, add_generation_prompt=True)
    # segments alternate template/content; the last content is our sentinel
    return [t for seg in segs[:-2] for t in seg], segs[-1]


class CompiledTask:
    """A task checked against the model's vocabulary, ready to make jobs."""

    def __init__(self, rt: LlamaRuntime, template: ChatTemplate, spec: TaskSpec, language: str = "auto") -> None:
        self.rt, self.spec, self.language = rt, spec, language
        # what a grammar may never pick: control tokens, and for JSON byte pieces too (runtime.py)
        self.mask = {"label": rt.without_control, "json": rt.whole_chars_only}[spec.output]
        self.langs: dict[str, CompiledLanguage] = {}
        try:
            for lang, lspec in spec.languages.items():
                self.langs[lang] = self._compile(template, lspec)
        except (PromptError, GrammarError):
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.spec.name

    def _compile(self, template: ChatTemplate, lspec: TaskLanguage) -> CompiledLanguage:
        grammar = Grammar(self.rt, lspec.grammar, lspec.grammar_source)
        try:
            prefix, suffix = _prefix_suffix(template, lspec)
            compiled = CompiledLanguage(self.spec.name, lspec, prefix, suffix, grammar)
            if self.spec.output == "label":
                self._check_labels(compiled)
            for _, answer in lspec.examples:
                self._check_answer(grammar, answer, lspec.grammar_source, "a few-shot answer")
        except (PromptError, GrammarError):
            grammar.close()
            raise
        return compiled

    def _check_labels(self, c: CompiledLanguage) -> None:
        source, labels = c.spec.grammar_source, c.spec.labels
        c.first_ids = c.grammar.allowed()
        shown = {lid: text.encode("utf-8") for lid, text in labels.items()}
        for tok in c.first_ids:
            piece = self.rt.piece(int(tok))
            fits = tuple(lid for lid, b in shown.items() if b.startswith(piece))
            if not fits:
                raise PromptError(f"{source}: grammar allows {piece.decode('utf-8', 'replace')!r}, "
                                  f"which starts none of the labels {list(labels.values())}")
            c.first_labels.append(fits)
        for text in labels.values():
            self._check_answer(c.grammar, text, source, "the label")
        c.label_ids = list(labels)
        c.label_rows = [np.array([i for i, f in enumerate(c.first_labels) if lid in f], dtype=np.int64)
                        for lid in c.label_ids]
        if any(len(rows) == 0 for rows in c.label_rows):
            raise PromptError(f"{source}: grammar does not allow every label {list(labels.values())}")

    def _check_answer(self, grammar: Grammar, answer: str, source: object, what: str) -> None:
        """The grammar must accept `answer` exactly: each token allowed, then only the end."""
        grammar.reset()
        try:
            for tok in self.rt.tokenize(answer):
                if tok not in set(grammar.allowed().tolist()):
                    raise PromptError(f"{source}: grammar does not allow {what} {answer!r}")
                grammar.accept(tok)
            after = [self.rt.is_end(int(t)) for t in grammar.allowed()]
            if self.spec.output == "label" and not all(after):
                raise PromptError(f"{source}: grammar allows text after the label {answer!r}; "
                                  "it must allow only the labels")
            if not any(after):
                raise PromptError(f"{source}: {what} {answer!r} is incomplete under the schema's grammar")
        finally:
            grammar.reset()

    def close(self) -> None:
        for lang in self.langs.values():
            lang.grammar.close()

    # -- requests -------------------------------------------------------------------------------
    def prepare(self, text: str, language: str | None = None) -> tuple[CompiledLanguage, list[int], bool]:
        """Checked, tokenized, truncated input; InputError when it cannot be processed."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("text is empty")
        text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> '?'
        if language is not None and language not in self.langs:
            raise InputError(f"task {self.name!r} has no {language!r} prompt (use one of {sorted(self.langs)})")
        fixed = language or (self.language if self.language != "auto" else None)
        lang = self.langs[pick_language(text, self.langs, fixed)]
        tokens = self.rt.tokenize(text.strip())
        limit = self.spec.max_text_tokens
        truncated = len(tokens) > limit
        if truncated:  # keep head and tail: openings and conclusions carry most of the meaning
            head = limit // 2
            tokens = tokens[:head] + self.rt.tokenize(" … ") + tokens[-(limit - head):]
        return lang, tokens, truncated

    def request_tokens(self, text: str, language: str | None = None) -> list[int]:
        """Exactly the tokens a request for `text` evaluates (its text + the turn's closing), for benchmarks."""
        lang, tokens, _ = self.prepare(text, language)
        return tokens + lang.suffix

    def job(self, res: Resources, text: str, language: str | None = None, reference: bool = False,
            on_done: Callable[["TaskJob"], None] | None = None) -> "TaskJob":
        lang, tokens, truncated = self.prepare(text, language)
        kind = JsonJob if self.spec.output == "json" else LabelJob
        return kind(res, self, lang, tokens, truncated, reference, on_done)


class TaskJob(Job):
    """One text of one task: copy the prefix, evaluate the text, read the answer."""

    def __init__(self, res: Resources, task: CompiledTask, lang: CompiledLanguage, tokens: list[int],
                 truncated: bool, reference: bool, on_done: Callable[["TaskJob"], None] | None) -> None:
        super().__init__()
        self.res, self.task, self.lang = res, task, lang
        self.tokens, self.truncated, self.reference = tokens, truncated, reference
        self.on_done = on_done
        self.result: TaskResult | None = None
        self.grammar: Grammar | None = None
        self.out: list[int] = []
        self.cancel_requested = False

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested

    def start(self) -> bool:
        prefix = self.res.prefixes.get(self.lang.prefix_key, self.lang.prefix)
        if not self.res.prefixes.ensure(prefix, self.res.evaluate_prefix) or not self.res.work_seqs:
            return False
        self.seq = self.res.work_seqs.pop()
        assert prefix.seq is not None  # ensure() made it resident
        self.res.rt.seq_rm(self.seq)
        self.res.rt.seq_cp(prefix.seq, self.seq)
        self.pending = self.tokens + self.lang.suffix
        self.pos = len(prefix.tokens)
        return True

    def _next(self, logits: np.ndarray) -> int | None:
        """Greedy under the grammar: the next token, or None at the end."""
        assert self.grammar is not None
        tok = self.grammar.best(self.task.mask(logits))
        if self.res.rt.is_end(tok):
            return None
        self.grammar.accept(tok)
        self.out.append(tok)
        return tok

    def _continue_with(self, tok: int | None) -> None:
        if tok is None:
            self._finish()
        else:
            self.pending, self.generating = [tok], True

    def _finish(self) -> None:
        raise NotImplementedError

    def _result(self, **answer: Any) -> None:
        self.result = TaskResult(self.task.name, self.lang.spec.language, len(self.tokens), self.truncated,
                                 (time.monotonic() - self.created) * 1000, **answer)
        self.done = True

    def stop(self, now: float) -> None:
        self.fail(TimeoutError("cancelled") if self.cancelled else TimeoutError("timed out"))

    def release(self) -> None:
        if self.seq is not None:
            self.res.rt.seq_rm(self.seq)
            self.res.work_seqs.append(self.seq)
            self.seq = None
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None
        if self.on_done is not None:
            self.on_done(self)


class LabelJob(TaskJob):
    def feed(self, logits: np.ndarray) -> None:
        if self.grammar is not None:  # continuing under the grammar
            if len(self.out) >= MAX_LABEL_TOKENS:
                raise GrammarError(f"{self.lang.spec.grammar_source}: no label after {MAX_LABEL_TOKENS} tokens")
            self._continue_with(self._next(logits))
            return
        lang = self.lang
        scores = logits[lang.first_ids]
        label_scores = np.array([scores[rows].max() for rows in lang.label_rows], dtype=np.float64)
        probs = np.exp(label_scores - label_scores.max())
        self.probs = probs / probs.sum()
        best = int(np.argmax(scores))
        fits = lang.first_labels[best]
        if len(fits) == 1 and not self.reference:
            self._answer(fits[0])
            return
        self.grammar = lang.grammar.clone()
        self._continue_with(self._next(logits))

    def _finish(self) -> None:
        text = b"".join(self.res.rt.piece(t) for t in self.out)
        label = next((lid for lid, shown in self.lang.spec.labels.items() if shown.encode("utf-8") == text), None)
        if label is None:  # the start-up check rules this out
            raise GrammarError(f"{self.lang.spec.grammar_source}: grammar produced {text!r}, not a label")
        self._answer(label)

    def _answer(self, label: str) -> None:
        probability = float(self.probs[self.lang.label_ids.index(label)])
        self._result(label=label, display=self.lang.spec.labels[label],
                     probability=float("nan") if self.reference else probability)


class JsonJob(TaskJob):
    def feed(self, logits: np.ndarray) -> None:
        if self.grammar is None:
            self.grammar = self.lang.grammar.clone()
        if len(self.out) >= self.task.spec.max_output_tokens:
            raise OutputLimit(f"task {self.task.name!r}: the answer did not end within "
                              f"{self.task.spec.max_output_tokens} tokens")
        self._continue_with(self._next(logits))

    def _finish(self) -> None:
        text = self.res.rt.detokenize(self.out)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:  # the grammar rules this out
            raise GrammarError(f"task {self.task.name!r}: the answer is not JSON ({exc})") from None
        self._result(output=value)
