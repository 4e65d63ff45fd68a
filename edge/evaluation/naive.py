"""The obvious way, for comparison: `llama_cpp.Llama` + a fresh grammar-constrained
`create_chat_completion` per request, with the same system prompt, few-shot turns and GBNF grammar
as the engine, greedy. Chat turns go through the same `Llama` object, as a one-model app would do.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from edge.engine.tasks import TaskLanguage, TaskSpec, pick_language

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage, CreateChatCompletionResponse


class NaiveClassifier:
    def __init__(self, model_path: Path | str, task: TaskSpec, n_threads: int, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama, LlamaGrammar  # heavy import, only when benchmarking

        self.llm = Llama(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        self.task = task
        self.grammars = {lang: LlamaGrammar.from_string(p.grammar, verbose=False) for lang, p in task.languages.items()}

    @staticmethod
    def _messages(p: TaskLanguage, text: str) -> list[ChatCompletionRequestMessage]:
        msgs: list[ChatCompletionRequestMessage] = [{"role": "system", "content": p.system}]
        for example, answer in p.examples:
            msgs += [{"role": "user", "content": example}, {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": text}]

    def classify(self, text: str) -> tuple[str, float]:
        """(label id, latency ms)."""
        lang = pick_language(text, self.task.languages)
        p = self.task.languages[lang]
        t0 = time.perf_counter()
        out = cast("CreateChatCompletionResponse",  # not streamed: one response
                   self.llm.create_chat_completion(self._messages(p, text), grammar=self.grammars[lang],
                                                   temperature=0.0, max_tokens=8))
        elapsed = (time.perf_counter() - t0) * 1000
        content = out["choices"][0]["message"]["content"]
        assert content is not None  # a grammar-constrained answer always has text
        answer = content.strip()
        label = next((lid for lid, shown in p.labels.items() if shown == answer), answer)
        return label, elapsed

    def chat_turn(self, messages: list[ChatCompletionRequestMessage], max_tokens: int) -> None:
        self.llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.7)

    def close(self) -> None:
        self.llm.close()
