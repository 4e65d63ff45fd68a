"""Bulk classification of a TSV file that survives interruption.

Every output row carries the input row number, rows are appended in order and flushed + fsynced
after each batch, and a re-run first cuts a torn last line (a crash mid-write), then continues
after the last complete row: no duplicates, no gaps.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from edge.engine.types import SentimentResult

OUT_HEADER = ("row", "label", "probability", "language", "truncated", "text")


class BulkInputError(ValueError):
    pass


def read_texts(path: Path) -> list[str]:
    """Texts of a TSV with a `text` column (header row), or of a plain file, one text a line."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise BulkInputError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise BulkInputError(f"input is a folder, not a file: {path}") from None
    if not rows:
        raise BulkInputError(f"input file is empty: {path}")
    if "text" in rows[0]:
        col = rows[0].index("text")
        return [r[col] if col < len(r) else "" for r in rows[1:]]
    return ["\t".join(r) for r in rows]


def completed_rows(out: Path) -> int:
    """How many input rows `out` already holds; repairs a torn last line first."""
    if not out.exists() or out.stat().st_size == 0:
        return 0
    with open(out, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not lines or lines[0].split("\t")[0] != OUT_HEADER[0]:
        raise BulkInputError(f"{out} exists and is not a qwen-edge results file; choose another --out")
    last = lines[-1].split("\t")[0] if len(lines) > 1 else None
    return int(last) + 1 if last is not None and last.isdigit() else 0


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def classify_file(texts: list[str], out: Path, classify: Callable[[list[str]], list[SentimentResult]],
                  batch: int = 8, progress: Callable[[int], None] | None = None) -> Iterator[int]:
    """Classify `texts` into `out`, resuming; yields the number of rows written so far."""
    start = completed_rows(out)
    new_file = start == 0
    with open(out, "a" if not new_file else "w", encoding="utf-8", newline="") as f:
        if new_file:
            f.write("\t".join(OUT_HEADER) + "\n")
        if progress and start:
            progress(start)
        for i in range(start, len(texts), batch):
            chunk = texts[i:i + batch]
            results = _classify_chunk(classify, chunk)
            lines = [f"{i + k}\t{r}\t{_clean(t)}\n" for k, (t, r) in enumerate(zip(chunk, results))]
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            if progress:
                progress(len(chunk))
            yield i + len(chunk)


def _classify_chunk(classify: Callable[[list[str]], list[SentimentResult]], chunk: list[str]) -> list[str]:
    """Result columns per text; one bad text (e.g. empty) must not stop a run of thousands."""
    try:
        return [_columns(r) for r in classify(chunk)]
    except ValueError:
        out = []
        for text in chunk:
            try:
                out.append(_columns(classify([text])[0]))
            except ValueError:
                out.append("error\t\t\t")
        return out


def _columns(r: SentimentResult) -> str:
    return f"{r.label}\t{r.probability:.4f}\t{r.language}\t{int(r.truncated)}"
