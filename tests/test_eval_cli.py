"""`qwen-edge eval sentiment` on a tiny TSV with the tiny generated model (real llama.cpp)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge.cli import cli

ROWS = ["text\tlabel", "a wonderful , warm film .\tpositive", "dull and far too long .\tnegative",
        '他说"很好"，我也觉得不错。\tpositive', "质量太差了，很失望。\tnegative", "great fun .\tpositive"]


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "tiny.tsv"
    path.write_text("\n".join(ROWS) + "\n", encoding="utf-8")
    return path


def run(*args: str):
    return CliRunner().invoke(cli, ["eval", "sentiment", *map(str, args)], catch_exceptions=False)


def test_json_report_is_consistent(tsv, tiny_gguf):
    res = run(tsv, "--model", tiny_gguf, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 5
    for key in ("accuracy", "macro_f1", "p50_ms", "p90_ms", "p99_ms", "confusion"):
        assert key in out
    cells = out["confusion"]
    assert sum(sum(row.values()) for row in cells.values()) == 5
    correct = sum(cells[g].get(g, 0) for g in cells)
    assert out["accuracy"] == pytest.approx(correct / 5, abs=1e-4)
    assert 0 <= out["macro_f1"] <= 1 and out["p50_ms"] > 0


def test_several_models_report_agreement(tsv, tiny_gguf, tiny_gguf_q8):
    res = run(tsv, "--model", tiny_gguf, "--model", tiny_gguf_q8, "--json", "--limit", "3", "--language", "en")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [m["n"] for m in out["models"]] == [3, 3]
    (pair,) = out["agreement"]
    assert {pair["a"], pair["b"]} == {str(tiny_gguf), str(tiny_gguf_q8)}
    assert 0 <= pair["agreement"] <= 1


def test_same_model_twice_agrees_fully(tsv, tiny_gguf):
    res = run(tsv, "--model", tiny_gguf, "--model", tiny_gguf, "--json", "--limit", "2")
    assert json.loads(res.stdout.strip().splitlines()[-1])["agreement"][0]["agreement"] == 1.0


def test_human_output_has_confusion_matrix(tsv, tiny_gguf):
    res = run(tsv, "--model", tiny_gguf, "--quiet")
    assert res.exit_code == 0
    assert "accuracy" in res.stdout and "gold\\pred" in res.stdout and "negative" in res.stdout


@pytest.mark.parametrize("content, message", [
    ("text\tlabel\nfine\tgreat\n", "unknown label 'great'"),
    ("text\tlabel\nno tab here\n", "expected 'text<TAB>label'"),
    ("text\tlabel\n", "no labelled rows"),
])
def test_bad_files_give_one_line_errors(tmp_path, tiny_gguf, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content, encoding="utf-8")
    res = run(bad, "--model", tiny_gguf, "--json")
    assert res.exit_code == 1
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_inputs(tmp_path, tsv, tiny_gguf):
    res = run(tmp_path / "nope.tsv", "--model", tiny_gguf)
    assert res.exit_code == 1 and "file not found" in res.output
    res = run(tsv, "--model", tmp_path / "nope.gguf")
    assert res.exit_code == 1 and "model file not found" in res.output
