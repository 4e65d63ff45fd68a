"""`qwen-edge bench task NAME --texts FILE`: one task's latency against the llama.cpp floor, and what
a prefix evicted to disk costs to bring back, against evaluating it again.

Per text, back to back so that load from elsewhere hits both alike: the engine's request
(`Engine.run_task`, the prefix cached) and the prefill floor of exactly the tokens the request
evaluates (raw_llama.py), on an empty cache and right after the task's instruction prefix: the text
attends to the prefix in the engine, and that attention alone costs a long prefix's task ~20 % over
the empty-cache floor (reported as prefix_floor_vs_floor: bare llama.cpp, no engine). Label tasks
should stay within 1.15x the floor (the first-token shortcut: one decode, no sampling loop); JSON
tasks add their answer's tokens, one decode each.

Restore vs recompute, per language of the task, `rounds` times: evict the prefix (its KV state is
saved to disk once), then time bringing it back (llama.cpp's per-sequence state read from the file)
and, on a fresh sequence, time evaluating its tokens again.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.engine.engine import Engine
from edge.evaluation.metrics import percentiles
from edge.evaluation.raw_llama import RawContext
from edge.settings import Settings


def _latency(engine: Engine, raw: RawContext, task: str, texts: Sequence[str]) -> dict:
    ours, floor, after = [], [], []
    compiled = engine.task(task)
    for text in texts:
        t0 = time.perf_counter()
        engine.run_task(task, [text])
        ours.append((time.perf_counter() - t0) * 1000)
        tokens = compiled.request_tokens(text)
        floor.append(raw.prefill_ms(tokens))
        after.append(raw.prefill_after_ms(compiled.prepare(text)[0].prefix, tokens))
    o, f, a = percentiles(ours), percentiles(floor), percentiles(after)
    return {"n": len(texts), "p50_ms": o["p50_ms"], "p90_ms": o["p90_ms"], "floor_p50_ms": f["p50_ms"],
            "floor_p90_ms": f["p90_ms"], "p50_vs_floor": round(o["p50_ms"] / f["p50_ms"], 3),
            "median_ratio_to_floor": round(float(np.median(np.array(ours) / np.array(floor))), 3),
            "floor_after_prefix_p50_ms": a["p50_ms"], "p50_vs_floor_after_prefix": round(o["p50_ms"] / a["p50_ms"], 3),
            # llama.cpp alone, no engine: what attending to the prefix adds to the empty-cache floor
            "prefix_floor_vs_floor": round(a["p50_ms"] / f["p50_ms"], 3)}


def _restore_vs_recompute(engine: Engine, task: str, rounds: int) -> dict:
    out = {}
    cache = engine.prefixes
    for lang in engine.task(task).langs.values():
        prefix = cache.get(lang.prefix_key, lang.prefix)
        restore, recompute = [], []
        for _ in range(rounds):
            with engine.lock:
                while not cache.ensure(prefix, engine._evaluate_prefix):
                    engine.batcher.step()
                cache.evict(prefix)  # saved to disk on its first eviction
                t0 = time.perf_counter()
                assert cache.ensure(prefix, None), "a saved prefix comes back without evaluation"
                restore.append((time.perf_counter() - t0) * 1000)
                cache.forget(prefix)  # no saved state: the next use evaluates it
                prefix = cache.get(lang.prefix_key, lang.prefix)
                t0 = time.perf_counter()
                while not cache.ensure(prefix, engine._evaluate_prefix):
                    engine.batcher.step()
                recompute.append((time.perf_counter() - t0) * 1000)
        r, c = float(np.median(restore)), float(np.median(recompute))
        out[lang.spec.language] = {"prefix_tokens": len(lang.prefix), "restore_ms": round(r, 2),
                                   "recompute_ms": round(c, 1), "restore_vs_recompute": round(r / c, 4)}
    return out


def run_task_bench(model: Path | str, settings: Settings, task: str, texts: Sequence[str], rounds: int = 3) -> dict:
    engine = Engine.load(model, settings)
    raw = None
    try:
        engine.warm_up()
        raw = RawContext(engine.rt)
        result = {"model": str(model), "task": task, "threads": raw.threads,
                  "kv_cache_type": engine.rt.config.kv_cache_type, **_latency(engine, raw, task, texts)}
        result["prefix"] = _restore_vs_recompute(engine, task, rounds)
        return result
    finally:
        if raw is not None:
            raw.close()
        engine.close()
