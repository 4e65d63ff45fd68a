"""`qwen-edge eval sentiment FILE.tsv --model M [--model M2 ...]`: accuracy, macro-F1, confusion, latency."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edge.engine.tasks import PromptError
from edge.engine.runtime import RuntimeError_
from edge.evaluation.datasets import SPLITS, DatasetError, read_tsv, select
from edge.evaluation.sentiment_eval import evaluate
from edge.settings import SettingsError, load_settings


@click.group("eval")
def eval_group() -> None:
    """Measure the model on labelled data."""


def _progress_factory(enabled: bool):
    def factory(model: str):
        def progress(done: int, total: int) -> None:
            if enabled and (done == total or done % 25 == 0):
                click.echo(f"\r{Path(model).name}: {done}/{total}", nl=done == total, err=True)
        return progress
    return factory


def _print_human(result: dict) -> None:
    for entry in result.get("models", [result]):
        click.echo(f"model     {entry['model']}")
        click.echo(f"n         {entry['n']}")
        click.echo(f"accuracy  {entry['accuracy']:.2%}")
        click.echo(f"macro-F1  {entry['macro_f1']:.4f}")
        click.echo(f"latency   p50 {entry['p50_ms']:.1f} ms  p90 {entry['p90_ms']:.1f} ms  p99 {entry['p99_ms']:.1f} ms")
        labels = list(entry["confusion"])
        width = max(len(x) for x in labels + ["gold\\pred"]) + 2
        click.echo("gold\\pred".ljust(width) + "".join(x.rjust(width) for x in labels))
        for gold, row in entry["confusion"].items():
            click.echo(gold.ljust(width) + "".join(str(row[p]).rjust(width) for p in labels))
        click.echo("")
    for pair in result.get("agreement", []):
        click.echo(f"agreement {Path(pair['a']).name} vs {Path(pair['b']).name}: {pair['agreement']:.2%}")


@eval_group.command("sentiment")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="GGUF file; repeat to compare several (e.g. F32, Q8_0, Q4_K_M).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N rows (of the split).")
@click.option("--language", type=click.Choice(["auto", "en", "zh"]), default=None,
              help="Prompt language; default: the configured one (auto = per text).")
@click.option("--split", type=click.Choice(SPLITS), default="all", show_default=True,
              help="'tune' = the ~30 % of rows used for prompt tuning (hash of the text), 'heldout' = the rest.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def sentiment(file: Path, models: tuple[Path, ...], as_json: bool, limit: int | None, language: str | None,
              split: str, config_file: Path | None, quiet: bool) -> None:
    """Classify every row of FILE.tsv (text<TAB>label) and compare with the labels."""
    for m in models:
        if not m.is_file():
            raise click.ClickException(f"model file not found: {m}")
    try:
        settings = load_settings(config_file, prompts={"language": language})
        examples = select(read_tsv(file, {"positive", "negative", "neutral"}), split, limit)
        if not examples:
            raise DatasetError(f"{file}: no rows in split {split!r}")
        result = evaluate(models, examples, settings, progress=_progress_factory(not quiet and not as_json))
    except (SettingsError, DatasetError, PromptError, RuntimeError_, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        _print_human(result)
