"""Grammar-constrained sentiment over a cached instruction prefix.

Per language, the system prompt + few-shot turns + the opening of the user turn are evaluated once
into their own KV sequence. A request copies that sequence (llama.cpp shares the cells, nothing is
recomputed), evaluates only its own text and the turn's closing tokens, and reads the answer.

The GBNF grammar in prompts/ is the contract. At start-up it is compiled by llama.cpp and applied to
the whole vocabulary once, which yields the set of tokens it allows as a first token; a request takes
the best-scoring of those (the same choice the grammar sampler makes with greedy decoding) and, when
that token already decides the label (the usual case), stops there. Otherwise it continues token by
token under the grammar sampler. `classify_reference` runs the grammar sampler from the first token;
tests check both paths agree.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from edge.engine.chat_template import ChatTemplate
from edge.engine.prompts import LanguagePrompt, PromptError, PromptSet, detect_language
from edge.engine.runtime import TOKEN_DATA, LlamaRuntime
from edge.engine.types import ChatMessage, SentimentResult

_MAX_LABEL_TOKENS = 16
_SENTINEL = "\ue0ffTEXT\ue0ff"  # never produced by tokenizing user text


class InputError(ValueError):
    """The request's text cannot be classified (e.g. empty)."""


class GrammarMask:
    """A llama.cpp grammar sampler applied to full-vocabulary logits."""

    def __init__(self, rt: LlamaRuntime, grammar: str, source: Path) -> None:
        self.rt = rt
        self.sampler = llama_cpp.llama_sampler_init_grammar(rt.vocab, grammar.encode("utf-8"), b"root")
        if not self.sampler:
            raise PromptError(f"{source}: llama.cpp cannot parse this GBNF grammar")
        self._cand = np.zeros(rt.n_vocab, dtype=TOKEN_DATA)

    def allowed(self, logits: np.ndarray | None = None) -> np.ndarray:
        """Token ids the grammar allows next (in its current state)."""
        cand = self._cand
        cand["id"] = np.arange(self.rt.n_vocab, dtype=np.int32)
        cand["logit"] = 0.0 if logits is None else logits
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=len(cand), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(arr))
        kept = cand[: arr.size]
        return kept["id"][np.isfinite(kept["logit"])].copy()

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self.sampler)

    def close(self) -> None:
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


@dataclass
class _Language:
    prompt: LanguagePrompt
    seq: int
    prefix: list[int]
    suffix: list[int]
    grammar: GrammarMask
    first_ids: np.ndarray                 # tokens the grammar allows first
    first_labels: list[tuple[str, ...]]   # for each of those, the labels it can still become
    label_ids: list[str]
    label_rows: list[np.ndarray]          # per label: indexes into first_ids consistent with it
    ready: bool = False


class SentimentClassifier:
    def __init__(self, rt: LlamaRuntime, prompts: PromptSet, template: ChatTemplate, prefix_seqs: dict[str, int],
                 work_seqs: list[int], max_text_tokens: int = 384, language: str = "auto") -> None:
        self.rt = rt
        self.template = template
        self.work_seqs = work_seqs
        self.max_text_tokens = max_text_tokens
        self.language = language
        self.langs = {lang: self._compile(p, prefix_seqs[lang]) for lang, p in prompts.sentiment.items()}

    # -- start-up checks ------------------------------------------------------------------------
    def _compile(self, prompt: LanguagePrompt, seq: int) -> _Language:
        grammar = GrammarMask(self.rt, prompt.grammar, prompt.grammar_file)
        try:
            first = grammar.allowed()
            labels_b = {lid: shown.encode("utf-8") for lid, shown in prompt.labels.items()}
            first_labels = []
            for tok in first:
                piece = self.rt.piece(int(tok))
                fits = tuple(lid for lid, b in labels_b.items() if b.startswith(piece))
                if not fits:
                    raise PromptError(f"{prompt.grammar_file}: grammar allows {piece.decode('utf-8', 'replace')!r}, "
                                      f"which starts none of the labels {list(prompt.labels.values())}")
                first_labels.append(fits)
            for lid, shown in prompt.labels.items():
                self._check_label_path(grammar, shown, prompt.grammar_file)
        except PromptError:
            grammar.close()
            raise
        label_ids = list(prompt.labels)
        rows = [np.array([i for i, f in enumerate(first_labels) if lid in f], dtype=np.int64) for lid in label_ids]
        prefix, suffix = self._prefix_suffix(prompt)
        return _Language(prompt, seq, prefix, suffix, grammar, first, first_labels, label_ids, rows)

    def _check_label_path(self, grammar: GrammarMask, shown: str, source: Path) -> None:
        """The grammar must accept `shown` exactly: each token allowed, then nothing but the end."""
        grammar.reset()
        for tok in self.rt.tokenize(shown):
            if tok not in set(grammar.allowed().tolist()):
                raise PromptError(f"{source}: grammar does not allow the label {shown!r}")
            grammar.accept(tok)
        after = grammar.allowed()
        if any(not self.rt.is_end(int(t)) for t in after):
            raise PromptError(f"{source}: grammar allows text after the label {shown!r}; it must allow only the labels")
        grammar.reset()

    def _prefix_suffix(self, prompt: LanguagePrompt) -> tuple[list[int], list[int]]:
        msgs = [ChatMessage("system", prompt.system)]
        for text, label in prompt.examples:
            msgs += [ChatMessage("user", text), ChatMessage("assistant", prompt.labels[label])]
        msgs.append(ChatMessage("user", _SENTINEL))
        segs = self.template.segments(msgs, add_generation_prompt=True)
        # segments alternate template/content; the last content is our sentinel
        prefix = [t for seg in segs[:-2] for t in seg]
        return prefix, segs[-1]

    def close(self) -> None:
        for lang in self.langs.values():
            lang.grammar.close()

    # -- requests -------------------------------------------------------------------------------
    def _ensure_prefix(self, lang: _Language) -> None:
        if not lang.ready:
            self.rt.seq_rm(lang.seq)
            self.rt.decode([(lang.seq, lang.prefix, 0)])
            lang.ready = True

    def prefix_lengths(self) -> dict[str, int]:
        return {k: len(v.prefix) for k, v in self.langs.items()}

    def _prepare(self, text: str, language: str | None) -> tuple[_Language, list[int], bool]:
        if not isinstance(text, str) or not text.strip():
            raise InputError("text is empty")
        text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> '?'
        lang_name = language or (self.language if self.language != "auto" else detect_language(text))
        if lang_name not in self.langs:
            raise InputError(f"unknown language {lang_name!r} (use one of {sorted(self.langs)})")
        tokens = self.rt.tokenize(text.strip())
        truncated = len(tokens) > self.max_text_tokens
        if truncated:  # keep head and tail: openings and conclusions carry most of the sentiment
            head = self.max_text_tokens // 2
            tokens = tokens[:head] + self.rt.tokenize(" … ") + tokens[-(self.max_text_tokens - head):]
        return self.langs[lang_name], tokens, truncated

    def request_tokens(self, text: str, language: str | None = None) -> list[int]:
        """Exactly the tokens a request for `text` evaluates (its text + the turn's closing), for benchmarks."""
        lang, tokens, _ = self._prepare(text, language)
        return tokens + lang.suffix

    def classify_many(self, texts: list[str], language: str | None = None) -> list[SentimentResult]:
        prepared = [self._prepare(t, language) for t in texts]  # validate all before any work
        results: list[SentimentResult] = []
        width = len(self.work_seqs)
        for start in range(0, len(prepared), width):
            results += self._classify_batch(prepared[start:start + width])
        return results

    def classify(self, text: str, language: str | None = None) -> SentimentResult:
        return self.classify_many([text], language)[0]

    def _classify_batch(self, batch: list[tuple[_Language, list[int], bool]]) -> list[SentimentResult]:
        t0 = time.perf_counter()
        jobs = []
        for seq, (lang, tokens, _) in zip(self.work_seqs, batch):
            self._ensure_prefix(lang)
            self.rt.seq_rm(seq)
            self.rt.seq_cp(lang.seq, seq)
            jobs.append((seq, tokens + lang.suffix, len(lang.prefix)))
        try:
            logits = self.rt.decode(jobs)
            answers = [self._answer(lang, logits[seq], seq, len(lang.prefix) + len(tokens) + len(lang.suffix))
                       for seq, (lang, tokens, _) in zip(self.work_seqs, batch)]
        finally:
            for seq, _ in zip(self.work_seqs, batch):
                self.rt.seq_rm(seq)
        per_item_ms = (time.perf_counter() - t0) * 1000 / len(batch)
        return [SentimentResult(label=lid, display=lang.prompt.labels[lid], probability=prob,
                                language=lang.prompt.language, n_tokens=len(tokens), truncated=trunc,
                                latency_ms=per_item_ms)
                for (lid, prob), (lang, tokens, trunc) in zip(answers, batch)]

    def _answer(self, lang: _Language, logits: np.ndarray, seq: int, pos: int) -> tuple[str, float]:
        scores = logits[lang.first_ids]
        best = int(np.argmax(scores))
        label_scores = np.array([scores[rows].max() for rows in lang.label_rows], dtype=np.float64)
        probs = np.exp(label_scores - label_scores.max())
        probs /= probs.sum()
        fits = lang.first_labels[best]
        if len(fits) == 1:
            label = fits[0]
        else:  # the first token is shared by several labels: let the grammar finish the answer
            label = self._continue(lang, int(lang.first_ids[best]), seq, pos)
        return label, float(probs[lang.label_ids.index(label)])

    def _continue(self, lang: _Language, token: int, seq: int, pos: int) -> str:
        lang.grammar.reset()
        out = [token]
        lang.grammar.accept(token)
        for _ in range(_MAX_LABEL_TOKENS):
            logits = self.rt.decode([(seq, [token], pos)])[seq]
            pos += 1
            allowed = lang.grammar.allowed(logits)
            token = int(allowed[np.argmax(logits[allowed])])
            if self.rt.is_end(token):
                break
            lang.grammar.accept(token)
            out.append(token)
        lang.grammar.reset()
        return self._label_of(lang, out)

    def _label_of(self, lang: _Language, tokens: list[int]) -> str:
        text = b"".join(self.rt.piece(t) for t in tokens)
        for lid, shown in lang.prompt.labels.items():
            if shown.encode("utf-8") == text:
                return lid
        raise AssertionError(f"grammar produced {text!r}, not a label")  # the start-up check rules this out

    def classify_reference(self, text: str, language: str | None = None) -> SentimentResult:
        """The plain grammar-constrained greedy path (no first-token shortcut), for tests and benchmarks."""
        t0 = time.perf_counter()
        lang, tokens, truncated = self._prepare(text, language)
        self._ensure_prefix(lang)
        seq = self.work_seqs[0]
        self.rt.seq_rm(seq)
        self.rt.seq_cp(lang.seq, seq)
        pos = len(lang.prefix)
        try:
            logits = self.rt.decode([(seq, tokens + lang.suffix, pos)])[seq]
            pos += len(tokens) + len(lang.suffix)
            lang.grammar.reset()
            out: list[int] = []
            for _ in range(_MAX_LABEL_TOKENS):
                allowed = lang.grammar.allowed(logits)
                token = int(allowed[np.argmax(logits[allowed])])
                if self.rt.is_end(token):
                    break
                lang.grammar.accept(token)
                out.append(token)
                logits = self.rt.decode([(seq, [token], pos)])[seq]
                pos += 1
            lang.grammar.reset()
        finally:
            self.rt.seq_rm(seq)
        lid = self._label_of(lang, out)
        return SentimentResult(lid, lang.prompt.labels[lid], float("nan"), lang.prompt.language, len(tokens),
                               truncated, (time.perf_counter() - t0) * 1000)
