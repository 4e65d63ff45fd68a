"""`qwen-edge bench`: the engine against the obvious way and against the llama.cpp floor, side by side.

One process, one model file. Order of phases:
1. engine alone: chat turns (time to first token, decode tokens/s) alternating with raw llama.cpp
   greedy decoding on the same weights and threads; bulk `classify_many` alternating with the raw
   prefill rate; then the peak RSS is read (before the naive path loads a second context).
2. latency, per text, the three measurements back to back so CPU contention hits all alike:
   engine `classify` (with a chat reply advanced a few tokens before it, i.e. chat interleaved),
   naive `create_chat_completion` (with a short naive chat turn before it), and the prefill floor
   (see raw_llama.py for the exact definitions).
Short texts are SST-2 phrases, long ones ChnSentiCorp reviews of at least `LONG_MIN_CHARS` chars.
"""
from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.engine.engine import Engine
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.evaluation.datasets import read_tsv
from edge.evaluation.metrics import percentiles
from edge.evaluation.naive import NaiveClassifier
from edge.evaluation.raw_llama import RawContext
from edge.settings import Settings

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

log = logging.getLogger(__name__)
LONG_MIN_CHARS = 120
CHAT_STEP_TOKENS = 4          # chat tokens generated between two sentiment requests
CHAT_PROMPTS = ("I had a rough day at work and my boss yelled at me.",
                "我最近总是失眠，心里很烦。",
                "My best friend is moving to another city next month.",
                "今天考试终于考完了，感觉还不错！")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    short_file: Path
    long_file: Path
    n_short: int = 40
    n_long: int = 20
    n_bulk: int = 32
    chat_turns: int = 8  # pairs of (engine turn, raw decode); the ratio is their median
    chat_max_tokens: int = 48


def load_texts(opts: BenchOptions) -> tuple[list[str], list[str]]:
    short = [e.text for e in read_tsv(opts.short_file)][: opts.n_short]
    long = [e.text for e in read_tsv(opts.long_file) if len(e.text) >= LONG_MIN_CHARS][: opts.n_long]
    return short, long


class InterleavedChat:
    """A chat conversation advanced a few tokens at a time; a finished reply starts the next turn."""

    def __init__(self, engine: Engine, max_tokens: int = 24) -> None:
        self.engine, self.max_tokens = engine, max_tokens
        self.history: list[ChatMessage] = []
        self.turn = 0
        self.gen: Generator[str, None, None] | None = None
        self.parts: list[str] = []

    def _start(self) -> None:
        self.history.append(ChatMessage("user", CHAT_PROMPTS[self.turn % len(CHAT_PROMPTS)]))
        self.turn += 1
        self.parts = []
        self.gen = self.engine.chat_stream(self.history, SamplingParams(max_tokens=self.max_tokens))

    def step(self, n: int) -> None:
        for _ in range(n):
            if self.gen is None:
                self._start()
            assert self.gen is not None
            try:
                self.parts.append(next(self.gen))
            except StopIteration:
                self.history.append(ChatMessage("assistant", "".join(self.parts)))
                self.gen = None

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()


def _chat_phase(engine: Engine, raw: RawContext, opts: BenchOptions) -> dict:
    """Chat turns alternating with raw greedy decoding; the ratio is the median of per-pair ratios,
    so a burst of load from elsewhere spoils one pair, not the result."""
    for _ in engine.chat_stream([ChatMessage("user", "hi")], SamplingParams(max_tokens=2)):
        pass  # evaluates the cached chat system prompt once, as any served chat has
    ttft, engine_tps, raw_tps = [], [], []
    for i in range(opts.chat_turns):
        msgs = [ChatMessage("user", CHAT_PROMPTS[i % len(CHAT_PROMPTS)])]
        stats = ChatStats()
        for _ in engine.chat_stream(msgs, SamplingParams(max_tokens=opts.chat_max_tokens), stats):
            pass
        if stats.completion_tokens < 2:
            continue  # the model ended at once: no decode speed to compare
        ttft.append(stats.ttft_ms)
        engine_tps.append(stats.decode_tps)
        prompt = engine.chat.prompt(msgs, opts.chat_max_tokens).tokens
        raw_tps.append(raw.decode_tps(prompt, stats.completion_tokens - 1))
    if not engine_tps:
        return {"chat_ttft_ms": float("nan"), "chat_decode_tps": float("nan"), "raw_decode_tps": float("nan"),
                "chat_decode_vs_raw": float("nan")}
    ratios = np.array(engine_tps) / np.array(raw_tps)
    return {"chat_ttft_ms": round(float(np.median(ttft)), 1), "chat_decode_tps": round(float(np.median(engine_tps)), 2),
            "raw_decode_tps": round(float(np.median(raw_tps)), 2),
            "chat_decode_vs_raw": round(float(np.median(ratios)), 3),
            "chat_pairs": len(ratios)}


def _bulk_phase(engine: Engine, raw: RawContext, texts: list[str]) -> dict:
    per_item = [len(engine.sentiment.request_tokens(t)) for t in texts]
    sample = engine.sentiment.request_tokens(" ".join(texts[:8]))
    rates, prefill = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        engine.classify_many(texts)
        rates.append(len(texts) / (time.perf_counter() - t0))
        prefill.append(raw.prefill_tps(sample))
    items_per_s, prefill_tps = max(rates), float(np.median(prefill))
    bound = prefill_tps / float(np.mean(per_item))
    return {"bulk_items_per_s": round(items_per_s, 2), "bulk_tokens_per_item": round(float(np.mean(per_item)), 1),
            "raw_prefill_tps": round(prefill_tps, 1), "prefill_bound_items_per_s": round(bound, 2),
            "bulk_vs_prefill_bound": round(items_per_s / bound, 3)}


def _latency_phase(engine: Engine, naive: NaiveClassifier, raw: RawContext, raw_f16: RawContext, texts: list[str],
                   progress: Progress | None) -> dict[str, list]:
    out: dict[str, list] = {"engine": [], "naive": [], "floor": [], "floor_f16": [], "agree": [], "tokens": []}
    chat = InterleavedChat(engine)
    naive_chat: list[ChatCompletionRequestMessage] = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    try:
        for i, text in enumerate(texts):
            chat.step(CHAT_STEP_TOKENS)
            t0 = time.perf_counter()
            result = engine.classify(text)
            out["engine"].append((time.perf_counter() - t0) * 1000)
            naive.chat_turn(naive_chat, CHAT_STEP_TOKENS)
            label, naive_ms = naive.classify(text)
            out["naive"].append(naive_ms)
            tokens = engine.sentiment.request_tokens(text)
            out["floor"].append(raw.prefill_ms(tokens))
            out["floor_f16"].append(raw_f16.prefill_ms(tokens))
            out["agree"].append(label == result.label)
            out["tokens"].append(len(tokens))
            if progress and (i + 1) % 10 == 0:
                progress(f"latency {i + 1}/{len(texts)}")
    finally:
        chat.close()
    return out


def _latency_summary(m: dict[str, list]) -> dict:
    e, n, f = (percentiles(m[k]) for k in ("engine", "naive", "floor"))
    return {"n": len(m["engine"]), "mean_tokens": round(float(np.mean(m["tokens"])), 1),
            "sentiment_p50_ms": e["p50_ms"], "sentiment_p90_ms": e["p90_ms"], "sentiment_p99_ms": e["p99_ms"],
            "naive_sentiment_p50_ms": n["p50_ms"], "naive_sentiment_p90_ms": n["p90_ms"],
            "naive_sentiment_p99_ms": n["p99_ms"],
            "floor_sentiment_p50_ms": f["p50_ms"], "floor_sentiment_p90_ms": f["p90_ms"],
            "floor_sentiment_p99_ms": f["p99_ms"],
            "floor_f16kv_sentiment_p50_ms": percentiles(m["floor_f16"])["p50_ms"],
            "p50_vs_floor": round(e["p50_ms"] / f["p50_ms"], 3),
            "p50_vs_floor_f16kv": round(e["p50_ms"] / percentiles(m["floor_f16"])["p50_ms"], 3),
            "median_ratio_to_floor": round(float(np.median(np.array(m["engine"]) / np.array(m["floor"]))), 3),
            "naive_p90_over_engine_p90": round(n["p90_ms"] / e["p90_ms"], 2),
            "naive_p50_over_engine_p50": round(n["p50_ms"] / e["p50_ms"], 2),
            "naive_label_agreement": round(float(np.mean(m["agree"])), 4)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_bench(model_path: Path | str, settings: Settings, opts: BenchOptions,
              progress: Progress | None = None) -> dict:
    short, long = load_texts(opts)
    say = progress or (lambda _msg: None)
    engine = Engine.load(model_path, settings)
    raw = raw_f16 = naive = None
    try:
        for lang in engine.sentiment.langs:
            engine.classify("ok" if lang == "en" else "好", lang)  # evaluate the cached prefixes once
        raw = RawContext(engine.rt)
        say("chat vs raw decode")
        result = {"model": str(model_path), "threads": raw.threads, **_chat_phase(engine, raw, opts)}
        say("bulk vs raw prefill")
        half = opts.n_bulk // 2
        result.update(_bulk_phase(engine, raw, short[: opts.n_bulk - half] + long[:half]))
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        say("latency: engine / naive / floor")
        naive = NaiveClassifier(model_path, engine.sentiment.spec, raw.threads, engine.rt.n_ctx)
        raw_f16 = RawContext(engine.rt, engine_kv=False)
        m_short = _latency_phase(engine, naive, raw, raw_f16, short, progress)
        m_long = _latency_phase(engine, naive, raw, raw_f16, long, progress)
    finally:
        if naive is not None:
            naive.close()
        for ctx in (raw, raw_f16):
            if ctx is not None:
                ctx.close()
        engine.close()
    both = {k: m_short[k] + m_long[k] for k in m_short}
    result.update(_latency_summary(both))
    result["kv_cache_type"] = engine.rt.config.kv_cache_type
    result["short"] = _latency_summary(m_short) if m_short["engine"] else None
    result["long"] = _latency_summary(m_long) if m_long["engine"] else None
    return result
