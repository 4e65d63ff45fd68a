"""Tab-separated text files as qwen-edge reads them (data sets, few-shot examples, bulk input):
UTF-8, no quoting (texts may contain `"`), one row a line.

One reader for every caller; each turns what can go wrong into its own error class and wording,
naming the file and the line.
"""
from __future__ import annotations

import csv
from pathlib import Path


class TsvError(ValueError):
    """A line the csv module cannot read (e.g. one over its field size limit, 128 KiB)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def read_rows(path: Path, errors: str = "strict") -> list[tuple[int, list[str]]]:
    """(line number, cells) of every line of `path`. `errors` is the UTF-8 decoding's ("replace":
    bad bytes become U+FFFD); OSError and, with "strict", UnicodeDecodeError propagate."""
    rows = []
    with open(path, encoding="utf-8", errors=errors, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for n, row in enumerate(reader, start=1):
                rows.append((n, row))
        except csv.Error as exc:
            raise TsvError(Path(path), reader.line_num, str(exc)) from None
    return rows
