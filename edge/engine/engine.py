"""The engine: one loaded model serving both roles from the same weights and the same KV cache.

KV sequence layout (llama.cpp seq ids, one unified cache of n_ctx cells):
    0, 1            sentiment instruction prefixes (en, zh), evaluated once, on first use
    2               chat system-prompt prefix
    3 .. 3+W-1      sentiment work sequences (a request's own text), emptied after each batch
    3+W .. n_seq-1  chat conversation slots
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge.engine.chat import ChatEngine
from edge.engine.chat_template import ChatTemplate
from edge.engine.prompts import LANGUAGES, PromptSet, load_prompts
from edge.engine.runtime import KVCacheFull, LlamaRuntime, RuntimeConfig
from edge.engine.sentiment import SentimentClassifier
from edge.engine.types import ChatMessage, ChatStats, SamplingParams, SentimentResult
from edge.model.gguf_check import check_gguf
from edge.model.preflight import context_options, resolve_kv_cache_type
from edge.settings import Settings

log = logging.getLogger(__name__)
SENTIMENT_BATCH = 4  # texts evaluated together in one llama_decode by classify_many


class Engine:
    def __init__(self, runtime: LlamaRuntime, settings: Settings) -> None:
        self.rt = runtime
        self.settings = settings
        self.template = ChatTemplate(runtime.chat_template(), runtime.tokenize)
        if self.template.fallback_reason:
            log.warning("model chat template unusable (%s); using ChatML", self.template.fallback_reason)
        n_seq = runtime.config.n_seq_max
        if n_seq < 3 + SENTIMENT_BATCH + 1:
            raise ValueError(f"n_seq_max must be at least {4 + SENTIMENT_BATCH}")
        self.prefix_seqs = {lang: i for i, lang in enumerate(LANGUAGES)}
        self.system_seq = len(LANGUAGES)
        self.work_seqs = list(range(self.system_seq + 1, self.system_seq + 1 + SENTIMENT_BATCH))
        self.chat_seqs = list(range(self.work_seqs[-1] + 1, n_seq))
        self.lock = threading.RLock()  # the runtime is single-threaded; the scheduler holds this
        self._build(load_prompts(settings.prompts.dir, settings.prompts.neutral, settings.prompts.few_shot))

    @classmethod
    def load(cls, model_path: Path | str, settings: Settings) -> "Engine":
        info = check_gguf(model_path)  # a hostile or broken file is refused here, before llama.cpp parses it
        m = settings.model
        rt = LlamaRuntime(model_path, RuntimeConfig(n_ctx=m.n_ctx, n_threads=m.n_threads,
                                                    kv_cache_type=resolve_kv_cache_type(info, settings),
                                                    **context_options(m, info)))
        try:
            return cls(rt, settings)
        except Exception:
            rt.close()
            raise

    def _build(self, prompts: PromptSet) -> None:
        p = self.settings.prompts
        sentiment = SentimentClassifier(self.rt, prompts, self.template, self.prefix_seqs, self.work_seqs,
                                        p.max_text_tokens, p.language)
        reserved = sum(sentiment.prefix_lengths().values()) + p.max_text_tokens + 16
        chat = ChatEngine(self.rt, self.template, prompts.chat_system, self.system_seq, self.chat_seqs,
                          self.settings.chat, reserved_tokens=reserved)
        old = getattr(self, "sentiment", None)
        self.prompts, self.sentiment, self.chat = prompts, sentiment, chat
        if old is not None:
            old.close()
        self.rt.clear()  # prefixes of the old prompts are stale

    def reload_prompts(self) -> None:
        """Re-read prompts/ (SIGHUP). On error the old prompts stay in force and the error is raised."""
        p = self.settings.prompts
        with self.lock:
            self._build(load_prompts(p.dir, p.neutral, p.few_shot))

    # -- sentiment ------------------------------------------------------------------------------
    def classify(self, text: str, language: str | None = None) -> SentimentResult:
        return self.classify_many([text], language)[0]

    def classify_many(self, texts: list[str], language: str | None = None) -> list[SentimentResult]:
        with self.lock:
            try:
                return self.sentiment.classify_many(texts, language)
            except KVCacheFull:
                self.chat.drop_idle()  # the cache is shared: idle conversations make room
                return [r for t in texts for r in self.sentiment.classify_many([t], language)]

    def classify_reference(self, text: str, language: str | None = None) -> SentimentResult:
        with self.lock:
            return self.sentiment.classify_reference(text, language)

    # -- chat -----------------------------------------------------------------------------------
    def chat_stream(self, messages: list[ChatMessage], params: SamplingParams = SamplingParams(),
                    stats: ChatStats | None = None) -> Iterator[str]:
        """A generator of reply pieces. The caller must step it from one thread at a time
        (the scheduler does); it holds no lock between steps so sentiment can run in between."""
        return self.chat.stream(messages, params, stats)

    def conversation(self) -> "Conversation":
        return Conversation(self)

    def drop_idle(self) -> int:
        with self.lock:
            return self.chat.drop_idle()

    @property
    def n_chat_slots(self) -> int:
        return len(self.chat_seqs)

    def info(self) -> dict:
        return {"path": str(self.rt.path), "n_ctx": self.rt.n_ctx, "n_vocab": self.rt.n_vocab,
                "kv_cache_type": self.rt.config.kv_cache_type, "chat_slots": len(self.chat_seqs),
                "file_type": self.rt.meta("general.file_type"), "name": self.rt.meta("general.name"),
                "evaluated_tokens": self.rt.n_evaluated}

    def close(self) -> None:
        self.sentiment.close()
        self.rt.close()


@dataclass
class Conversation:
    """A local multi-turn chat (CLI, tests): sentiment first, then the streamed reply."""
    engine: Engine
    history: list[ChatMessage] = field(default_factory=list)
    last_stats: ChatStats | None = None

    def respond(self, text: str, params: SamplingParams = SamplingParams()) -> tuple[SentimentResult, Iterator[str]]:
        label = self.engine.classify(text)
        self.history.append(ChatMessage("user", text))
        return label, self._reply(params)

    def _reply(self, params: SamplingParams) -> Iterator[str]:
        stats = ChatStats()
        parts: list[str] = []
        for piece in self.engine.chat_stream(self.history, params, stats):
            parts.append(piece)
            yield piece
        self.history.append(ChatMessage("assistant", "".join(parts)))
        self.last_stats = stats

    def reset(self) -> None:
        self.history.clear()
