"""Bulk classification survives interruption: no duplicates, no gaps, torn lines repaired."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.engine.bulk import BulkInputError, answer_file, completed_rows, read_texts


def _rows(out: Path) -> list[int]:
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("row\t")
    return [int(line.split("\t")[0]) for line in lines[1:]]


def test_interrupted_run_resumes_without_duplicates_or_gaps(engine, tmp_path):
    texts = [f"review {i}: {'great' if i % 3 else 'awful'}" for i in range(30)]
    texts[7] = "   "  # a bad row is recorded as an error, not fatal
    out = tmp_path / "out.tsv"
    run = answer_file(texts, out, engine.classify_many, batch=8)
    next(run)
    run.close()  # interrupted after one batch
    with open(out, "a", encoding="utf-8") as f:
        f.write("8\tposit")  # torn line from a crash mid-write
    assert completed_rows(out) == 8
    for _ in answer_file(texts, out, engine.classify_many, batch=8):
        pass
    assert _rows(out) == list(range(30))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[8].split("\t")[1] == "error"
    assert all(line.split("\t")[1] in ("positive", "negative") for i, line in enumerate(lines[1:]) if i != 7)


def test_refuses_to_append_to_a_foreign_file(tmp_path, engine):
    out = tmp_path / "precious.tsv"
    out.write_text("my\tdata\n", encoding="utf-8")
    with pytest.raises(BulkInputError, match="not a qwen-edge results file"):
        list(answer_file(["x"], out, engine.classify_many))
    assert out.read_text(encoding="utf-8") == "my\tdata\n"


def test_read_texts_header_and_plain(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('text\tlabel\nhe said "hi"\tpositive\n', encoding="utf-8")
    assert read_texts(tsv) == ['he said "hi"']
    plain = tmp_path / "b.txt"
    plain.write_text("one\ntwo\n", encoding="utf-8")
    assert read_texts(plain) == ["one", "two"]
    with pytest.raises(BulkInputError, match="not found"):
        read_texts(tmp_path / "missing.tsv")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def test_cli_killed_midway_resumes(tiny_gguf, tmp_path):
    inp = tmp_path / "in.tsv"
    inp.write_text("text\n" + "".join(f"line {i} is fine\n" for i in range(150)), encoding="utf-8")
    out = tmp_path / "out.tsv"
    args = _cli("classify", "--file", str(inp), "--out", str(out), "--model", str(tiny_gguf))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0 and len(out.read_bytes().splitlines()) > 10:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = completed_rows(out)
    assert 0 < done
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert _rows(out) == list(range(150))


def test_cli_single_text_and_errors(tiny_gguf, tmp_path):
    ok = subprocess.run(_cli("classify", "hello world", "--model", str(tiny_gguf), "--json"),
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert '"label"' in ok.stdout
    empty = subprocess.run(_cli("classify", "  ", "--model", str(tiny_gguf)), capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "text is empty" in empty.stderr and "Traceback" not in empty.stderr
    missing = subprocess.run(_cli("classify", "x", "--model", str(tmp_path / "nope.gguf")),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_chat_prints_sentiment_line_then_reply(tiny_gguf):
    res = subprocess.run(_cli("chat", "--model", str(tiny_gguf), "--max-tokens", "5"),
                         input="我今天很开心\n/reset\nhello\n/exit\n", capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QWEN_EDGE_MODEL__N_CTX": "4096"})  # the tiny vocabulary makes long prompts
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split(" LLM 情感判断: ")[1] in ("正面", "负面")
    assert "(conversation cleared)" in res.stdout
    assert any(" LLM sentiment: " in line for line in lines)
