"""The compute floor: bare llama.cpp calls on the engine's already loaded weights.

A second llama.cpp context is created on the engine's model (the weights are shared, not copied)
with llama.cpp's default context parameters except n_ctx, n_batch (also as the ubatch, llama.cpp's
default 512, even where the engine computes 256-token ubatches to save memory: the floor keeps the
larger one), the thread count and, unless
`engine_kv=False`, the KV cache type and flash attention, which match the engine's (the KV type is
a memory choice of the configuration, so the floor is computed for the same one; the benchmark also
reports the floor with llama.cpp's default f16 cache). Definitions used by the benchmark:

- prefill floor of a request: wall time of ONE `llama_decode` of exactly the tokens the engine's
  request evaluates (its text + the turn's closing tokens), logits for the last token only, on an
  EMPTY KV cache (position 0). No tokenization, no Python work, no sampling is counted.
- prefill floor after the prefix: the same decode with the task's instruction prefix already in the
  cache (as the engine keeps it), so the text's tokens attend to it as they must in the engine.
- raw prefill rate: tokens/s of one `llama_decode` of n_batch tokens on an empty KV cache.
- raw decode rate: tokens/s of single-token `llama_decode` calls with greedy argmax, after a prompt,
  timed from the first generated token's decode to the last one.
"""
from __future__ import annotations

import time

import llama_cpp
import numpy as np

from edge.engine.config import RuntimeConfig
from edge.engine.runtime import LlamaRuntime, context_params


class RawContext:
    def __init__(self, rt: LlamaRuntime, engine_kv: bool = True) -> None:
        self.rt = rt
        threads = llama_cpp.llama_n_threads(rt.ctx)
        c = rt.config
        # n_seq_max 1: one sequence, so the unified cache context_params asks for changes nothing
        config = RuntimeConfig(n_ctx=rt.n_ctx, n_batch=rt.n_batch, n_ubatch=rt.n_batch, n_threads=threads,
                               n_seq_max=1, kv_cache_type=c.kv_cache_type if engine_kv else "f16",
                               flash_attn=c.flash_attn if engine_kv else None)
        params = context_params(config)
        self.threads = threads
        self.ctx = llama_cpp.llama_init_from_model(rt.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the raw benchmark context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._kept: list[int] | None = None  # the prefix left in the cache by prefill_after_ms

    def _decode(self, tokens: list[int]) -> float:
        """One llama_decode of `tokens` appended to the cache; returns its wall time in seconds."""
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        batch = llama_cpp.llama_batch_get_one(arr, len(tokens))
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        return elapsed

    def prefill_ms(self, tokens: list[int]) -> float:
        """The prefill floor of `tokens`: one decode on an empty KV cache, in ms."""
        if len(tokens) > self.rt.n_batch:
            raise ValueError(f"{len(tokens)} tokens do not fit one batch of {self.rt.n_batch}")
        llama_cpp.llama_memory_clear(self.memory, True)
        self._kept = None
        return self._decode(tokens) * 1000

    def prefill_after_ms(self, prefix: list[int], tokens: list[int]) -> float:
        """The prefill floor of `tokens` right after `prefix`, which stays in the cache between calls
        (evaluated, untimed, when it changes), in ms."""
        if len(tokens) > self.rt.n_batch:
            raise ValueError(f"{len(tokens)} tokens do not fit one batch of {self.rt.n_batch}")
        if self._kept != prefix:
            llama_cpp.llama_memory_clear(self.memory, True)
            for start in range(0, len(prefix), self.rt.n_batch):
                self._decode(prefix[start:start + self.rt.n_batch])
            self._kept = list(prefix)
        else:
            llama_cpp.llama_memory_seq_rm(self.memory, 0, len(prefix), -1)
        return self._decode(tokens) * 1000

    def prefill_tps(self, sample_tokens: list[int], repeats: int = 3) -> float:
        """Best-case prefill throughput: full n_batch batches on an empty cache (median of repeats)."""
        n = self.rt.n_batch
        tokens = (sample_tokens * (n // max(1, len(sample_tokens)) + 1))[:n]
        times = [self.prefill_ms(tokens) for _ in range(repeats)]
        return n / (float(np.median(times)) / 1000)

    def decode_tps(self, prompt: list[int], n_tokens: int = 64) -> float:
        """Greedy single-token decoding after `prompt`; tokens/s over n_tokens steps."""
        llama_cpp.llama_memory_clear(self.memory, True)
        self._kept = None
        self._decode(prompt)
        total = 0.0
        for _ in range(n_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.rt.n_vocab,))
            t0 = time.perf_counter()
            tok = int(np.argmax(logits))
            total += time.perf_counter() - t0
            total += self._decode([tok])
        return n_tokens / total

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
