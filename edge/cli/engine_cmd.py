"""`qwen-edge tasks`, `qwen-edge run TASK`, `qwen-edge classify` (the sentiment task) and
`qwen-edge chat`: the engine in a terminal."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge.cli.common import config_option, friendly_errors, model_option, open_engine, setting_option, settings_from

EMOJI = {"positive": "😄", "negative": "😞", "neutral": "😐"}
SENTIMENT_LINE = {"zh": "{emoji} LLM 情感判断: {display}", "en": "{emoji} LLM sentiment: {display}"}
CHAT_BANNER = "qwen-edge chat · {model} · /reset: new conversation · /exit or Ctrl-D: quit"
CHAT_COMMANDS = {"/exit": "exit", "/quit": "exit", "/reset": "reset"}


def _answer(task: str, text: str | None, in_file: Path | None, out_file: Path | None, language: str | None,
            as_json: bool, model_path: Path | None, config_file: Path | None) -> None:
    if (text is None) == (in_file is None):
        raise click.UsageError("give either TEXT or --file IN --out OUT")
    if in_file is not None and out_file is None:
        raise click.UsageError("--file needs --out")
    settings = settings_from(config_file, prompts={"language": language})
    lang = None if language in (None, "auto") else language
    engine = open_engine(settings, model_path)
    with friendly_errors():
        engine.task(task)  # an unknown or refused task is one line, before any work
        if text is not None:
            r = engine.run_task(task, [text], lang)[0]
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False) if as_json else _line(r))
            return
        assert in_file is not None and out_file is not None  # checked above
        _answer_bulk(engine, task, in_file, out_file, lang)


def _line(r) -> str:
    answer = f"{r.label}\t{r.probability:.3f}" if r.label is not None else json.dumps(r.output, ensure_ascii=False)
    return f"{answer}\t{r.language}" + ("\ttruncated" if r.truncated else "")


def _answer_bulk(engine, task: str, in_file: Path, out_file: Path, lang: str | None) -> None:
    from tqdm import tqdm

    from edge.engine.bulk import answer_file, read_texts
    texts = read_texts(in_file)
    with tqdm(total=len(texts), unit="text", disable=None, file=sys.stderr) as bar:
        for _ in answer_file(texts, out_file, lambda chunk: engine.run_task(task, chunk, lang), progress=bar.update):
            pass
    click.echo(f"{len(texts)} rows -> {out_file}", err=True)


def _task_options(command):
    for option in reversed([
        click.argument("text", required=False),
        click.option("--file", "in_file", type=click.Path(path_type=Path),
                     help="Bulk: TSV with a `text` column, or one text a line."),
        click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Bulk: results TSV (a re-run resumes)."),
        setting_option("prompts.language"),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        model_option, config_option]):
        command = option(command)
    return command


@click.command()
@click.argument("task")
@_task_options
def run(task: str, **options) -> None:
    """Answer TEXT with TASK (see `qwen-edge tasks`), or every row of --file into --out."""
    _answer(task, **options)


@click.command()
@_task_options
def classify(**options) -> None:
    """Sentiment of TEXT, or of every row of --file into --out (`run sentiment`)."""
    _answer("sentiment", **options)


@click.command()
@config_option
def tasks(config_file: Path | None) -> None:
    """The tasks in prompts/tasks/ (and why any is refused)."""
    from edge.engine.tasks import load_prompts
    settings = settings_from(config_file)
    with friendly_errors():
        p = settings.prompts
        found = load_prompts(p.dir, p.neutral, p.few_shot, p.max_text_tokens)
    for name, spec in found.tasks.items():
        answers = ", ".join(spec.label_ids) if spec.output == "label" else "JSON (schema.json)"
        click.echo(f"{name:<12} {spec.output:<6} {'/'.join(spec.languages):<6} {spec.description}  [{answers}]")
    for name, why in found.errors.items():
        click.echo(f"{name:<12} REFUSED {why}")


@click.command()
@model_option
@config_option
@click.option("--max-tokens", type=int, default=None, help="Reply length limit.")
def chat(model_path: Path | None, config_file: Path | None, max_tokens: int | None) -> None:
    """Interactive chat: the sentiment line first, then the streamed reply. /reset, /exit."""
    from edge.cli.terminal import enable_line_editing, interactive
    from edge.engine.types import SamplingParams
    settings = settings_from(config_file)
    engine = open_engine(settings, model_path)
    convo = engine.conversation()
    tty = interactive()
    if tty:
        enable_line_editing()
        click.echo(CHAT_BANNER.format(model=Path(engine.info()["path"]).name))
    params = SamplingParams(max_tokens=max_tokens)
    while True:
        try:
            line = input("> " if tty else "").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: quit
            if tty:
                click.echo()
            break
        command = CHAT_COMMANDS.get(line) if line.startswith("/") else None
        if command == "exit":
            break
        if command == "reset":
            convo.reset()
            click.echo("(conversation cleared)")
        elif line.startswith("/") and command is None:
            click.echo(f"(unknown command {line.split()[0]}: /reset starts a new conversation, /exit quits)")
        elif line:
            try:
                _turn(convo, line, params)
            except KeyboardInterrupt:  # Ctrl-C during a reply: quit, on a line of its own
                click.echo()
                break


def _turn(convo, line: str, params) -> None:
    """One turn: the sentiment line, then the reply as it streams, with the terminal's echo off."""
    from edge.cli.terminal import echo_off
    with friendly_errors(), echo_off():
        label, reply = convo.respond(line, params)
        click.echo(SENTIMENT_LINE[label.language].format(emoji=EMOJI.get(label.label, "🙂"), display=label.display))
        for piece in reply:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
