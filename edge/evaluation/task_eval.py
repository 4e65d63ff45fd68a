"""Evaluate a task on a labelled set: label tasks (accuracy, macro-F1, confusion, one model or several
side by side) and JSON tasks (per-field exact match, schema validity).

Each text is answered on its own (`Engine.run_task`), so latency is a single request's latency,
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
from typing import Any

import jsonschema

from edge.engine.engine import SENTIMENT, Engine
from edge.evaluation.datasets import DatasetError, Example, in_tune_split, read_jsonl
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
              language: str | None = None, progress: Progress | None = None, task: str = SENTIMENT) -> ModelRun:
    t0 = time.perf_counter()
    engine = Engine.load(model_path, settings)
    load_s = time.perf_counter() - t0
    try:
        spec = engine.task(task)
        labels = set(spec.spec.label_ids)
        bad = sorted({e.label for e in examples} - labels)
        if bad:
            raise DatasetError(f"labels {bad} are not in the label set of task {task!r}: {sorted(labels)}")
        engine.warm_up()  # evaluate the cached prefixes before timing anything
        run = ModelRun(str(model_path), [], [], [], load_s)
        for i, ex in enumerate(examples):
            result = engine.run_task(task, [ex.text], language)[0]
            run.predicted.append(result.label or "")
            run.probabilities.append(result.probability or 0.0)
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
             label_order: Sequence[str] = ("positive", "negative", "neutral"), task: str = SENTIMENT) -> dict:
    runs = [run_model(m, examples, settings, language, progress(str(m)) if progress else None, task) for m in models]
    return report(runs, examples, label_order)


# -- JSON tasks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class JsonCase:
    text: str
    lang: str
    expected: dict


def read_json_cases(path: Path | str, split: str = "all", limit: int | None = None) -> list[JsonCase]:
    """Cases of a JSON task: one {"text", "lang", "expected": {...}} object per line."""
    path = Path(path)
    rows = read_jsonl(path, lambda raw: JsonCase(raw["text"], raw.get("lang", ""), raw["expected"]),
                      '{"text", "lang", "expected"}')
    cases = [case for _, case in rows if split == "all" or in_tune_split(case.text) == (split == "tune")]
    if not cases:
        raise DatasetError(f"{path}: no cases in split {split!r}")
    return cases[:limit] if limit else cases


def evaluate_json(model: Path | str, task: str, cases: Sequence[JsonCase], settings: Settings,
                  language: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Per-field exact match (null only matches null), all fields right, and validity against the
    task's schema (checked with jsonschema, independently of the grammar)."""
    engine = Engine.load(model, settings)
    try:
        schema = engine.task(task).spec.schema or {}
        engine.warm_up()
        answers, latencies = [], []
        for i, case in enumerate(cases):
            result = engine.run_task(task, [case.text], language)[0]
            answers.append(result.output)
            latencies.append(result.latency_ms)
            if progress:
                progress(i + 1, len(cases))
    finally:
        engine.close()
    fields = sorted({k for c in cases for k in c.expected})
    exact = {f: sum(isinstance(a, dict) and a.get(f) == c.expected.get(f) for a, c in zip(answers, cases, strict=True))
             for f in fields}
    valid = sum(jsonschema.Draft202012Validator(schema).is_valid(a) for a in answers)
    misses = [{"text": c.text, "expected": c.expected, "got": a}
              for a, c in zip(answers, cases, strict=True) if a != c.expected]
    n = len(cases)
    return {"model": str(model), "task": task, "n": n,
            "field_exact": {f: round(exact[f] / n, 4) for f in fields},
            "all_fields": round(sum(a == c.expected for a, c in zip(answers, cases, strict=True)) / n, 4),
            "valid": round(valid / n, 4), **percentiles(latencies), "misses": misses}
