"""Labelled sentiment sets: UTF-8 TSV, header `text<TAB>label`, no quoting (texts may contain `"`).

The tuning split is a pure function of each text (hash, not position or a random generator), so the
same rows are held out whatever order or subset of the file is read.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edge.tsv import TsvError, read_rows

TUNE_PERCENT = 30  # share of each file used for prompt tuning; the rest is held out for reporting
SPLITS = ("all", "tune", "heldout")


class DatasetError(ValueError):
    """The file cannot be read as a labelled TSV; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


T = TypeVar("T")


def read_jsonl(path: Path, make: Callable[[dict], T], shape: str) -> list[tuple[int, T]]:
    """(line number, make(object)) for each non-blank line of a JSON-lines file; DatasetError naming
    the file, the line and `shape` (what a line holds) when the file or a line cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, make(json.loads(line))))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}:{n}: expected {shape} ({exc})") from None
    return rows


def in_tune_split(text: str) -> bool:
    """True for the ~30 % of texts kept for prompt tuning: first two bytes of SHA-256(text) mod 100."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:2], "big") % 100 < TUNE_PERCENT


def read_tsv(path: Path | str, allowed_labels: set[str] | None = None) -> list[Example]:
    """Rows of `text<TAB>label`; a header row `text<TAB>label` is skipped, blank lines ignored."""
    path = Path(path)
    try:
        rows = read_rows(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a TSV file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except TsvError as exc:
        raise DatasetError(str(exc)) from None
    examples = []
    for n, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if n == 1 and [c.strip().lower() for c in row[:2]] == ["text", "label"]:
            continue
        if len(row) != 2 or not row[0].strip():
            raise DatasetError(f"{path}:{n}: expected 'text<TAB>label', got {len(row)} column(s)")
        label = row[1].strip().lower()
        if allowed_labels is not None and label not in allowed_labels:
            raise DatasetError(f"{path}:{n}: unknown label {row[1].strip()!r} "
                               f"(expected one of {sorted(allowed_labels)})")
        examples.append(Example(row[0].strip(), label))
    if not examples:
        raise DatasetError(f"{path}: no labelled rows")
    return examples


def select(examples: list[Example], split: str = "all", limit: int | None = None) -> list[Example]:
    """The rows of one split ('all', 'tune', 'heldout'), then the first `limit` of them."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (use one of {SPLITS})")
    if split != "all":
        want_tune = split == "tune"
        examples = [e for e in examples if in_tune_split(e.text) == want_tune]
    return examples[:limit] if limit else examples
