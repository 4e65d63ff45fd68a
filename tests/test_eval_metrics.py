"""Metrics and data-set reading on hand-made cases whose answers are worked out by hand."""
from __future__ import annotations

import math

import pytest

from edge.evaluation.datasets import DatasetError, Example, in_tune_split, read_tsv, select
from edge.evaluation.metrics import (accuracy, agreement, classification_report, confusion, macro_f1,
                                     per_label_f1, percentiles)

LABELS = ["positive", "negative"]


def test_confusion_counts_gold_rows_predicted_columns():
    c = confusion(["positive", "positive", "negative", "negative", "negative"],
                  ["positive", "negative", "negative", "negative", "positive"], LABELS)
    assert c.to_dict() == {"positive": {"positive": 1, "negative": 1}, "negative": {"positive": 1, "negative": 2}}
    assert c.n == 5
    assert accuracy(c) == pytest.approx(3 / 5)


def test_f1_worked_example():
    # positive: tp=1, fp=1, fn=1 -> F1 = 2/4 = 0.5 ; negative: tp=2, fp=1, fn=1 -> F1 = 4/6
    c = confusion(["positive", "positive", "negative", "negative", "negative"],
                  ["positive", "negative", "negative", "negative", "positive"], LABELS)
    f1 = per_label_f1(c)
    assert f1["positive"] == pytest.approx(0.5)
    assert f1["negative"] == pytest.approx(4 / 6)
    assert macro_f1(c) == pytest.approx((0.5 + 4 / 6) / 2)


def test_always_one_label_has_high_accuracy_but_low_macro_f1():
    gold = ["negative"] * 9 + ["positive"]
    pred = ["negative"] * 10
    c = confusion(gold, pred, LABELS)
    assert accuracy(c) == pytest.approx(0.9)
    # negative: tp=9, fp=1, fn=0 -> 18/19; positive never predicted -> 0
    assert macro_f1(c) == pytest.approx((18 / 19 + 0) / 2)


def test_perfect_and_all_wrong():
    gold = ["positive", "negative", "positive"]
    assert classification_report(gold, gold, LABELS)["macro_f1"] == 1.0
    wrong = ["negative", "positive", "negative"]
    report = classification_report(gold, wrong, LABELS)
    assert report["accuracy"] == 0.0 and report["macro_f1"] == 0.0


def test_macro_f1_ignores_labels_absent_from_gold_unless_asked():
    c = confusion(["positive", "negative"], ["positive", "negative"], ["positive", "negative", "neutral"])
    assert macro_f1(c) == 1.0
    assert macro_f1(c, ["positive", "negative", "neutral"]) == pytest.approx(2 / 3)


def test_unknown_label_and_length_mismatch_are_errors():
    with pytest.raises(ValueError, match="neutral"):
        confusion(["positive"], ["neutral"], LABELS)
    with pytest.raises(ValueError):
        confusion(["positive"], [], LABELS)


def test_agreement_and_percentiles():
    assert agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    p = percentiles(list(range(1, 101)))
    assert p["p50_ms"] == pytest.approx(50.5)
    assert p["p90_ms"] == pytest.approx(90.1)
    assert math.isnan(percentiles([])["p50_ms"])


def test_read_tsv_keeps_quotes_and_checks_labels(tmp_path):
    f = tmp_path / "set.tsv"
    f.write_text('text\tlabel\nhe said "great\tpositive\n\nbad " movie\tnegative\n', encoding="utf-8")
    rows = read_tsv(f, {"positive", "negative"})
    assert [(r.text, r.label) for r in rows] == [('he said "great', "positive"), ('bad " movie', "negative")]
    f.write_text("text\tlabel\nfine\tgood\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r":2: unknown label 'good'"):
        read_tsv(f, {"positive", "negative"})
    f.write_text("just one column\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="expected 'text<TAB>label'"):
        read_tsv(f)
    f.write_bytes(b"caf\xe9\tpositive\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_tsv(f)
    with pytest.raises(DatasetError, match="not found"):
        read_tsv(tmp_path / "missing.tsv")


def test_split_is_a_function_of_the_text_only():
    texts = [f"review number {i}" for i in range(2000)]
    share = sum(map(in_tune_split, texts)) / len(texts)
    assert 0.26 < share < 0.34
    rows = [Example(t, "positive") for t in texts]
    tune = {e.text for e in select(rows, "tune")}
    held = {e.text for e in select(list(reversed(rows)), "heldout")}
    assert tune.isdisjoint(held) and len(tune) + len(held) == len(texts)
    assert len(select(rows, "all", limit=5)) == 5
