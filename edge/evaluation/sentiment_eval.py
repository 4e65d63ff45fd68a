"""Evaluate the engine's sentiment labels on a labelled set, one model or several side by side.

Each text is classified on its own (`Engine.classify`), so latency is a single request's latency,
the way an interactive client sees it. With several models, each is loaded, run and closed in turn
(one copy of weights in memory at a time) and pairwise agreement of their labels is reported.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.engine.engine import Engine
from edge.evaluation.datasets import DatasetError, Example
from edge.evaluation.metrics import agreement, classification_report, percentiles
from edge.settings import Settings

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class ModelRun:
    model: str
    predicted: list[str]
    probabilities: list[float]
    latencies_ms: list[float]
    load_s: float


def run_model(model_path: Path | str, examples: Sequence[Example], settings: Settings,
              language: str | None = None, progress: Progress | None = None) -> ModelRun:
    t0 = time.perf_counter()
    engine = Engine.load(model_path, settings)
    load_s = time.perf_counter() - t0
    try:
        labels = set(engine.sentiment.spec.label_ids)
        bad = sorted({e.label for e in examples} - labels)
        if bad:
            raise DatasetError(f"labels {bad} are not in the prompt label set {sorted(labels)}")
        for lang in engine.sentiment.langs:  # evaluate the cached prefixes before timing anything
            engine.classify("ok" if lang == "en" else "好", lang)
        run = ModelRun(str(model_path), [], [], [], load_s)
        for i, ex in enumerate(examples):
            result = engine.classify(ex.text, language)
            run.predicted.append(result.label)
            run.probabilities.append(result.probability)
            run.latencies_ms.append(result.latency_ms)
            if progress:
                progress(i + 1, len(examples))
        return run
    finally:
        engine.close()


def report(runs: Sequence[ModelRun], examples: Sequence[Example], label_order: Sequence[str]) -> dict:
    """One object per model (n, accuracy, macro_f1, percentiles, confusion) plus pairwise agreement."""
    gold = [e.label for e in examples]
    labels = [name for name in label_order if name in set(gold) | {p for r in runs for p in r.predicted}]
    per_model = []
    for run in runs:
        entry = {"model": run.model, **classification_report(gold, run.predicted, labels),
                 **percentiles(run.latencies_ms), "load_s": round(run.load_s, 2)}
        per_model.append(entry)
    out: dict = per_model[0] if len(per_model) == 1 else {"n": len(gold), "models": per_model}
    if len(runs) > 1:
        out["agreement"] = [{"a": a.model, "b": b.model, "agreement": round(agreement(a.predicted, b.predicted), 4)}
                            for a, b in itertools.combinations(runs, 2)]
    return out


def evaluate(models: Sequence[Path | str], examples: Sequence[Example], settings: Settings,
             language: str | None = None, progress: Callable[[str], Progress] | None = None,
             label_order: Sequence[str] = ("positive", "negative", "neutral")) -> dict:
    runs = [run_model(m, examples, settings, language, progress(str(m)) if progress else None) for m in models]
    return report(runs, examples, label_order)
