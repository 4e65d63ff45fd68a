"""Classification metrics from (gold, predicted) label pairs, and latency percentiles."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Confusion:
    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]  # counts[gold][predicted], in `labels` order

    @property
    def n(self) -> int:
        return sum(map(sum, self.counts))

    def to_dict(self) -> dict[str, dict[str, int]]:
        """{gold: {predicted: count}}."""
        return {g: dict(zip(self.labels, row, strict=True)) for g, row in zip(self.labels, self.counts, strict=True)}


def confusion(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> Confusion:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    names = tuple(labels) if labels else tuple(sorted(set(gold) | set(predicted)))
    index = {name: i for i, name in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for g, p in zip(gold, predicted, strict=True):
        if g not in index or p not in index:
            raise ValueError(f"label {g if g not in index else p!r} is not one of {list(names)}")
        counts[index[g]][index[p]] += 1
    return Confusion(names, tuple(tuple(r) for r in counts))


def accuracy(c: Confusion) -> float:
    return sum(c.counts[i][i] for i in range(len(c.labels))) / c.n if c.n else 0.0


def per_label_f1(c: Confusion) -> dict[str, float]:
    """F1 of each label; a label never predicted and never gold counts as 0 (sklearn's zero_division=0)."""
    out = {}
    for i, name in enumerate(c.labels):
        tp = c.counts[i][i]
        predicted = sum(row[i] for row in c.counts)
        actual = sum(c.counts[i])
        out[name] = 2 * tp / (predicted + actual) if predicted + actual else 0.0
    return out


def macro_f1(c: Confusion, labels: Sequence[str] | None = None) -> float:
    """Mean F1 over `labels` (default: the labels that occur in gold)."""
    f1 = per_label_f1(c)
    names = list(labels) if labels else [n for i, n in enumerate(c.labels) if sum(c.counts[i])]
    return sum(f1[n] for n in names) / len(names) if names else 0.0


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of items two classifiers label the same way."""
    if len(a) != len(b):
        raise ValueError("agreement needs two label lists of the same length")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a) if a else 0.0


def percentiles(values_ms: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """{'p50_ms': ..., ...}, linear interpolation (numpy's default); NaN for no values."""
    if not len(values_ms):
        return {f"p{q}_ms": float("nan") for q in qs}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 2) for q in qs}


def classification_report(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    c = confusion(gold, predicted, labels)
    return {"n": c.n, "accuracy": round(accuracy(c), 4), "macro_f1": round(macro_f1(c), 4),
            "f1": {k: round(v, 4) for k, v in per_label_f1(c).items()}, "confusion": c.to_dict()}
