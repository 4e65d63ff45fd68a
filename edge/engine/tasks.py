"""Prompts are configuration: tasks and chat personas read from `prompts/`, checked, refused clearly.

Layout (every file plain UTF-8, editable without touching code):
    tasks/<name>/task.toml            what the task returns, its languages and limits (see TASK_KEYS)
    tasks/<name>/labels.toml          label tasks: label id -> how each language writes it
    tasks/<name>/schema.json          JSON tasks: the JSON schema every answer matches
    tasks/<name>/<lang>/system.txt    the instruction
    tasks/<name>/<lang>/few_shot.tsv  optional examples: text<TAB>label id, or text<TAB>JSON answer
    tasks/<name>/<lang>/<grammar>     optional hand-written GBNF (label tasks), named in task.toml
    chat/<lang>/system.txt            the warm, empathetic assistant, per language
    chat/hints.toml                   optional: per emotion label, a line telling the assistant how the
                                      user seems to feel (chat.emotion_hints)
Each task folder is read on its own: a broken one is reported (its message names the file) and the
others are served. Checks that need the tokenizer (grammar against labels, few-shot answers against
the grammar) run when the engine compiles the task.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge.engine.grammar import GrammarError, label_gbnf, load_schema, schema_gbnf
from edge.tsv import TsvError, read_rows

LANGUAGES = ("en", "zh")
OUTPUTS = ("label", "json")
DEFAULT_MAX_OUTPUT_TOKENS = 256
# task.toml key -> (type, meaning); anything else in the file is refused, so a typo is not ignored.
TASK_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "description": (str, "one line shown by `qwen-edge tasks` and GET /v1/tasks"),
    "output": (str, "label: one label of labels.toml; json: JSON matching schema.json"),
    "languages": (list, "prompt languages, each a folder with system.txt"),
    "max_text_tokens": (int, "longer texts keep head and tail (default: prompts.max_text_tokens)"),
    "max_output_tokens": (int, f"json tasks: answer length limit (default {DEFAULT_MAX_OUTPUT_TOKENS})"),
    "grammar": (str, "label tasks: hand-written GBNF file in each language folder (default: derived)"),
    "grammar_optional_labels": (str, "the same, used when optional labels are on (prompts.neutral)"),
}


class PromptError(ValueError):
    """A prompt file is missing or invalid; the message names the file."""


@dataclass(frozen=True)
class TaskLanguage:
    language: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (text, the answer exactly as the model should write it)
    grammar: str                           # GBNF of the allowed answers
    grammar_source: Path                   # the file the grammar comes from (named in errors)
    labels: dict[str, str]                 # label tasks: label id -> display in this language


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    output: Literal["label", "json"]
    languages: dict[str, TaskLanguage]
    max_text_tokens: int
    max_output_tokens: int
    folder: Path
    schema: dict | None = None

    @property
    def label_ids(self) -> list[str]:
        first = next(iter(self.languages.values()))
        return list(first.labels)

    def describe(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "output": self.output,
                               "languages": list(self.languages)}
        if self.output == "label":
            out["labels"] = self.label_ids
        else:
            out["schema"] = self.schema
        return out


@dataclass(frozen=True)
class Prompts:
    tasks: dict[str, TaskSpec]
    chat_system: dict[str, str]               # language -> system prompt
    emotion_hints: dict[str, dict[str, str]]  # language -> emotion label -> hint line
    errors: dict[str, str] = field(default_factory=dict)  # task name -> why it was refused
    source_dir: Path = Path(".")


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PromptError(f"prompt file missing: {path}") from None
    except UnicodeDecodeError:
        raise PromptError(f"prompt file is not UTF-8: {path}") from None
    except IsADirectoryError:
        raise PromptError(f"expected a file, found a folder: {path}") from None
    if not text:
        raise PromptError(f"prompt file is empty: {path}")
    return text


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path}: invalid TOML: {exc}") from None


def read_tsv_pairs(path: Path) -> list[tuple[int, str, str]]:
    """(line number, first column, second column) of a two-column TSV; a `text<TAB>...` header and
    blank lines are skipped, anything else malformed is refused naming the line."""
    try:
        lines = read_rows(path)
    except UnicodeDecodeError:
        raise PromptError(f"{path}: not UTF-8") from None
    except TsvError as exc:
        raise PromptError(str(exc)) from None
    rows = []
    for n, row in lines:
        if not row or (len(row) == 1 and not row[0].strip()) or (n == 1 and row[0] == "text"):
            continue
        if len(row) != 2 or not row[0].strip():
            raise PromptError(f"{path}:{n}: expected 'text<TAB>answer'")
        rows.append((n, row[0].strip(), row[1].strip()))
    return rows


def _task_table(folder: Path) -> dict:
    path = folder / "task.toml"
    table = read_toml(path)
    for key, value in table.items():
        if key not in TASK_KEYS:
            raise PromptError(f"{path}: unknown key {key!r} (known: {', '.join(TASK_KEYS)})")
        kind = TASK_KEYS[key][0]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PromptError(f"{path}: {key} has the wrong type ({TASK_KEYS[key][1]})")
    if table.get("output") not in OUTPUTS:
        raise PromptError(f"{path}: output must be one of {', '.join(OUTPUTS)}")
    languages = table.get("languages") or []
    if not languages or any(lang not in LANGUAGES for lang in languages) or len(set(languages)) != len(languages):
        raise PromptError(f"{path}: languages must be a non-empty list of {', '.join(LANGUAGES)}")
    for key in ("max_text_tokens", "max_output_tokens"):
        if key in table and not 1 <= table[key] <= 8192:
            raise PromptError(f"{path}: {key} must be between 1 and 8192")
    if not str(table.get("description", "")).strip():
        raise PromptError(f"{path}: description is missing")
    return table


def _labels(path: Path, languages: list[str], optional_on: bool) -> tuple[dict[str, dict[str, str]], bool]:
    """label id -> language -> display, and whether optional labels are among them."""
    table = read_toml(path)
    labels: dict[str, dict[str, str]] = {}
    with_optional = False
    for label_id, entry in table.items():
        if not isinstance(entry, dict):
            raise PromptError(f"{path}: [{label_id}] must be a table")
        if entry.get("optional"):
            if not optional_on:
                continue
            with_optional = True
        for lang in languages:
            if not isinstance(entry.get(lang), str) or not entry[lang].strip():
                raise PromptError(f"{path}: label {label_id!r} has no {lang} text")
        labels[label_id] = {lang: entry[lang] for lang in languages}
    if len(labels) < 2:
        raise PromptError(f"{path}: at least two labels are needed")
    for lang in languages:
        shown = [v[lang] for v in labels.values()]
        if len(set(shown)) != len(shown):
            raise PromptError(f"{path}: two labels are written the same way in {lang}")
    return labels, with_optional


def _label_examples(path: Path, labels: dict[str, dict[str, str]], lang: str) -> tuple[tuple[str, str], ...]:
    examples = []
    for n, text, label in read_tsv_pairs(path):
        if label in labels:
            examples.append((text, labels[label][lang]))
        elif not label:
            raise PromptError(f"{path}:{n}: the label is empty")
        # other ids: e.g. neutral examples while the optional label is off
    return tuple(examples)


def _json_examples(path: Path) -> tuple[tuple[str, str], ...]:
    examples = []
    for n, text, answer in read_tsv_pairs(path):
        try:
            value = json.loads(answer)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{n}: the answer is not JSON ({exc})") from None
        examples.append((text, json.dumps(value, ensure_ascii=False)))  # as the grammar writes JSON
    return tuple(examples)


def _label_language(folder: Path, table: dict, lang: str, labels: dict[str, dict[str, str]], with_optional: bool,
                    few_shot: bool) -> TaskLanguage:
    base = folder / lang
    shown = {lid: by_lang[lang] for lid, by_lang in labels.items()}
    # a hand-written grammar is written for one label set: with optional labels on, only its own file applies
    grammar_file = table.get("grammar_optional_labels") if with_optional else table.get("grammar")
    if grammar_file:
        source, grammar = base / grammar_file, read_text(base / grammar_file)
    else:
        source, grammar = folder / "labels.toml", label_gbnf(list(shown.values()))
    shots = base / "few_shot.tsv"
    examples = _label_examples(shots, labels, lang) if few_shot and shots.exists() else ()
    return TaskLanguage(lang, read_text(base / "system.txt"), examples, grammar, source, shown)


def _json_language(folder: Path, lang: str, grammar: str, few_shot: bool) -> TaskLanguage:
    base = folder / lang
    examples = _json_examples(base / "few_shot.tsv") if few_shot and (base / "few_shot.tsv").exists() else ()
    return TaskLanguage(lang, read_text(base / "system.txt"), examples, grammar, folder / "schema.json", {})


def load_task(folder: Path, optional_labels: bool = False, few_shot: bool = True,
              default_max_text_tokens: int = 384) -> TaskSpec:
    """One task folder, checked; PromptError naming the first bad file."""
    table = _task_table(folder)
    languages = list(table["languages"])
    schema = None
    if table["output"] == "label":
        labels, with_optional = _labels(folder / "labels.toml", languages, optional_labels)
        langs = {lang: _label_language(folder, table, lang, labels, with_optional, few_shot) for lang in languages}
    else:
        schema = load_schema(folder / "schema.json")
        try:
            grammar = schema_gbnf(schema, str(folder / "schema.json"))
        except GrammarError as exc:
            raise PromptError(str(exc)) from None
        langs = {lang: _json_language(folder, lang, grammar, few_shot) for lang in languages}
    return TaskSpec(name=folder.name, description=" ".join(str(table["description"]).split()),
                    output=table["output"], languages=langs,
                    max_text_tokens=table.get("max_text_tokens", default_max_text_tokens),
                    max_output_tokens=table.get("max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS),
                    folder=folder, schema=schema)


def _chat_prompts(prompts_dir: Path) -> dict[str, str]:
    chat = {lang: read_text(prompts_dir / "chat" / lang / "system.txt") for lang in LANGUAGES
            if (prompts_dir / "chat" / lang).is_dir()}
    if not chat:
        raise PromptError(f"no chat persona: expected {prompts_dir / 'chat' / '<language>' / 'system.txt'}")
    return chat


def _emotion_hints(prompts_dir: Path) -> dict[str, dict[str, str]]:
    path = prompts_dir / "chat" / "hints.toml"
    if not path.exists():
        return {}
    table = read_toml(path)
    hints: dict[str, dict[str, str]] = {}
    for label, by_lang in table.items():
        if not isinstance(by_lang, dict) or not all(isinstance(v, str) for v in by_lang.values()):
            raise PromptError(f"{path}: [{label}] must map languages to text")
        for lang, text in by_lang.items():
            hints.setdefault(lang, {})[label] = text.strip()
    return hints


def load_prompts(prompts_dir: Path | str, optional_labels: bool = False, few_shot: bool = True,
                 max_text_tokens: int = 384) -> Prompts:
    """Every task folder and the chat personas. A bad task folder is left out and reported in
    `errors`; a missing folder or a bad chat persona raises PromptError."""
    prompts_dir = Path(prompts_dir)
    if not prompts_dir.is_dir():
        raise PromptError(f"prompts folder not found: {prompts_dir}")
    tasks: dict[str, TaskSpec] = {}
    errors: dict[str, str] = {}
    task_root = prompts_dir / "tasks"
    for folder in sorted(p for p in task_root.iterdir() if p.is_dir()) if task_root.is_dir() else []:
        try:
            tasks[folder.name] = load_task(folder, optional_labels, few_shot, max_text_tokens)
        except (PromptError, GrammarError) as exc:
            errors[folder.name] = str(exc)
    return Prompts(tasks=tasks, chat_system=_chat_prompts(prompts_dir), emotion_hints=_emotion_hints(prompts_dir),
                   errors=errors, source_dir=prompts_dir)


def detect_language(text: str) -> str:
    """'zh' when CJK ideographs make up a fair share of the letters, else 'en'."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    letters = sum(1 for ch in text if ch.isalpha())
    return "zh" if letters and cjk / letters >= 0.2 else "en"


def pick_language(text: str, available: list[str] | dict[str, Any], fixed: str | None = None) -> str:
    """The prompt language for `text`: `fixed` when given, else detected; the first available one
    when the detected language has no prompt."""
    choice = fixed or detect_language(text)
    names = list(available)
    return choice if choice in names else names[0]
