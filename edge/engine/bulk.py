"""Bulk task answers (`qwen-edge run TASK --file`, `classify --file`) that survive interruption.

Every output row carries the input row number, rows are appended in order and flushed + fsynced
after each batch, and a re-run first cuts a torn last line (a crash mid-write), then continues
after the last complete row: no duplicates, no gaps.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from edge.engine.task_runner import TaskResult
from edge.tsv import TsvError, read_rows

# answer: the label id, or for JSON tasks the JSON answer on one line
OUT_HEADER = ("row", "answer", "probability", "language", "truncated", "text")


class BulkInputError(ValueError):
    pass


def read_texts(path: Path) -> list[str]:
    """Texts of a TSV with a `text` column (header row), or of a plain file, one text a line."""
    try:
        rows = [row for _, row in read_rows(path, errors="replace")]
    except TsvError as exc:  # e.g. a line over csv's field size limit (128 KiB)
        raise BulkInputError(f"{path}: line {exc.line}: {exc.reason}") from None
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
    header = ("\t".join(OUT_HEADER) + "\n").encode()
    with open(out, "rb+") as f:
        data = f.read()
        # check before cutting anything: a file that is not ours is never modified
        if not (data.startswith(header) or header.startswith(data)):
            raise BulkInputError(f"{out} exists and is not a qwen-edge results file; choose another --out")
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    # split on "\n" only: str.splitlines() also breaks at U+2028, \x85, ... which texts may hold
    lines = data.decode("utf-8", errors="replace").split("\n")[:-1]
    last = lines[-1].split("\t")[0] if len(lines) > 1 else None
    return int(last) + 1 if last is not None and last.isdigit() else 0


def _clean(text: str) -> str:
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates cannot be written
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


class BulkWriteError(OSError):
    """The results file could not be written (disk full, file too large); whole rows are kept."""


def _append(f, out: Path, text: str, rows_done: int) -> None:
    """Append whole rows and fsync; on a write error cut the partial rows off again, so the file
    only ever holds complete rows (and a re-run resumes after them)."""
    data = memoryview(text.encode("utf-8"))
    size = os.fstat(f.fileno()).st_size
    try:
        while data:
            data = data[f.write(data):]  # unbuffered: a short write returns its count
        os.fsync(f.fileno())
    except OSError as exc:
        f.truncate(size)
        raise BulkWriteError(f"cannot write {out}: {exc.strerror or exc}; its {rows_done} complete rows "
                             "are kept and a re-run resumes after them") from None


def answer_file(texts: list[str], out: Path, answer: Callable[[list[str]], list[TaskResult]],
                  batch: int = 8, progress: Callable[[int], None] | None = None) -> Iterator[int]:
    """Answer `texts` into `out`, resuming; yields the number of rows written so far."""
    start = completed_rows(out)
    new_file = start == 0
    with open(out, "ab" if not new_file else "wb", buffering=0) as f:
        if new_file:
            _append(f, out, "\t".join(OUT_HEADER) + "\n", 0)
        if progress and start:
            progress(start)
        for i in range(start, len(texts), batch):
            chunk = texts[i:i + batch]
            results = _answer_chunk(answer, chunk)
            lines = [f"{i + k}\t{r}\t{_clean(t)}\n" for k, (t, r) in enumerate(zip(chunk, results, strict=True))]
            _append(f, out, "".join(lines), i)
            if progress:
                progress(len(chunk))
            yield i + len(chunk)


def _answer_chunk(answer: Callable[[list[str]], list[TaskResult]], chunk: list[str]) -> list[str]:
    """Result columns per text; one bad text (e.g. empty) must not stop a run of thousands."""
    try:
        return [_columns(r) for r in answer(chunk)]
    except ValueError:
        out = []
        for text in chunk:
            try:
                out.append(_columns(answer([text])[0]))
            except ValueError:
                out.append("error\t\t\t")
        return out


def _columns(r: TaskResult) -> str:
    if r.label is None:
        return f"{json.dumps(r.output, ensure_ascii=False)}\t\t{r.language}\t{int(r.truncated)}"
    return f"{r.label}\t{r.probability:.4f}\t{r.language}\t{int(r.truncated)}"
