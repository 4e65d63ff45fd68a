"""Prompts are configuration: read them from `prompts/`, check them, refuse clearly when wrong.

Layout (every file plain UTF-8, editable without touching code):
    sentiment/labels.toml                 canonical label ids -> how each language writes them
    sentiment/<lang>/system.txt           the "cold sentiment analyst" instruction
    sentiment/<lang>/few_shot.tsv         optional examples (text<TAB>label id)
    sentiment/<lang>/labels.gbnf          grammar: the only answers allowed
    sentiment/<lang>/labels_neutral.gbnf  the same with the neutral label (prompts.neutral = true)
    chat/system.txt                       the warm, empathetic assistant
Grammar-vs-labels agreement needs the tokenizer and is checked by the sentiment classifier.
"""
from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("en", "zh")


class PromptError(ValueError):
    """A prompt file is missing or invalid; the message names the file."""


@dataclass(frozen=True)
class LanguagePrompt:
    language: str
    system: str
    examples: tuple[tuple[str, str], ...]   # (text, label id)
    grammar: str
    grammar_file: Path
    labels: dict[str, str]                  # label id -> display string, in label-file order


@dataclass(frozen=True)
class PromptSet:
    sentiment: dict[str, LanguagePrompt]
    chat_system: str
    source_dir: Path


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PromptError(f"prompt file missing: {path}") from None
    except UnicodeDecodeError:
        raise PromptError(f"prompt file is not UTF-8: {path}") from None
    if not text:
        raise PromptError(f"prompt file is empty: {path}")
    return text


def _read_labels(path: Path, neutral: bool) -> dict[str, dict[str, str]]:
    try:
        table = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path}: invalid TOML: {exc}") from None
    labels: dict[str, dict[str, str]] = {}
    for label_id, entry in table.items():
        if not isinstance(entry, dict):
            raise PromptError(f"{path}: [{label_id}] must be a table")
        if entry.get("optional") and not neutral:
            continue
        for lang in LANGUAGES:
            if not isinstance(entry.get(lang), str) or not entry[lang].strip():
                raise PromptError(f"{path}: label {label_id!r} has no {lang} text")
        labels[label_id] = {lang: entry[lang] for lang in LANGUAGES}
    if len(labels) < 2:
        raise PromptError(f"{path}: at least two labels are needed")
    for lang in LANGUAGES:
        shown = [v[lang] for v in labels.values()]
        if len(set(shown)) != len(shown):
            raise PromptError(f"{path}: two labels are written the same way in {lang}")
    return labels


def _read_examples(path: Path, labels: dict[str, dict[str, str]]) -> tuple[tuple[str, str], ...]:
    if not path.exists():
        return ()
    examples = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if n == 1 and row[:2] == ["text", "label"]:
                continue
            if len(row) != 2 or not row[0].strip():
                raise PromptError(f"{path}:{n}: expected 'text<TAB>label'")
            text, label = row[0].strip(), row[1].strip()
            if label not in labels:
                continue  # e.g. neutral examples while the neutral label is off
            examples.append((text, label))
    return tuple(examples)


def load_prompts(prompts_dir: Path, neutral: bool = False, few_shot: bool = True) -> PromptSet:
    """Read and check every prompt file; raise PromptError naming the first bad one."""
    prompts_dir = Path(prompts_dir)
    if not prompts_dir.is_dir():
        raise PromptError(f"prompts folder not found: {prompts_dir}")
    labels = _read_labels(prompts_dir / "sentiment" / "labels.toml", neutral)
    grammar_name = "labels_neutral.gbnf" if neutral else "labels.gbnf"
    sentiment = {}
    for lang in LANGUAGES:
        base = prompts_dir / "sentiment" / lang
        grammar_file = base / grammar_name
        sentiment[lang] = LanguagePrompt(
            language=lang,
            system=_read_text(base / "system.txt"),
            examples=_read_examples(base / "few_shot.tsv", labels) if few_shot else (),
            grammar=_read_text(grammar_file),
            grammar_file=grammar_file,
            labels={label_id: shown[lang] for label_id, shown in labels.items()},
        )
    return PromptSet(sentiment=sentiment, chat_system=_read_text(prompts_dir / "chat" / "system.txt"),
                     source_dir=prompts_dir)


def detect_language(text: str) -> str:
    """'zh' when CJK ideographs make up a fair share of the letters, else 'en'."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    letters = sum(1 for ch in text if ch.isalpha())
    return "zh" if letters and cjk / letters >= 0.2 else "en"
