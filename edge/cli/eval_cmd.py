"""`qwen-edge eval TASK FILE --model M`: any task on labelled data (label tasks: accuracy, macro-F1,
confusion, latency, agreement between models; JSON tasks: per-field exact match and validity),
`qwen-edge eval tools FILE.jsonl`: tool calls on Home Assistant's own prompts, and
`qwen-edge eval chat FILE.jsonl`: free-text replies (language, refusals, parroting, truncation)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from edge.cli.common import friendly_errors
from edge.engine.tasks import PromptError, TaskSpec, load_task
from edge.evaluation.datasets import SPLITS, DatasetError, read_tsv, select
from edge.evaluation.task_eval import evaluate, evaluate_json, read_json_cases
from edge.settings import Settings, load_settings

SPECIAL = ("tools", "chat")  # evaluations that are not a task's


class EvalGroup(click.Group):
    """`eval tools` and `eval chat` are their own commands; any other name is a task in prompts/tasks/."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or _task_command(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), "TASK"]


@click.group("eval", cls=EvalGroup)
def eval_group() -> None:
    """Measure the model on labelled data: `eval TASK FILE --model M` (e.g. sentiment, emotion,
    spam, extract), `eval tools FILE.jsonl --model M` or `eval chat FILE.jsonl --model M`."""


def _progress_factory(enabled: bool):
    def factory(model: str):
        def progress(done: int, total: int) -> None:
            if enabled and (done == total or done % 25 == 0):
                click.echo(f"\r{Path(model).name}: {done}/{total}", nl=done == total, err=True)
        return progress
    return factory


def _print_labels(result: dict) -> None:
    for entry in result.get("models", [result]):
        click.echo(f"model     {entry['model']}")
        click.echo(f"n         {entry['n']}")
        click.echo(f"accuracy  {entry['accuracy']:.2%}")
        click.echo(f"macro-F1  {entry['macro_f1']:.4f}")
        click.echo(f"latency   p50 {entry['p50_ms']:.1f} ms  p90 {entry['p90_ms']:.1f} ms  "
                   f"p99 {entry['p99_ms']:.1f} ms")
        labels = list(entry["confusion"])
        width = max(len(x) for x in labels + ["gold\\pred"]) + 2
        click.echo("gold\\pred".ljust(width) + "".join(x.rjust(width) for x in labels))
        for gold, row in entry["confusion"].items():
            click.echo(gold.ljust(width) + "".join(str(row[p]).rjust(width) for p in labels))
        click.echo("")
    for pair in result.get("agreement", []):
        click.echo(f"agreement {Path(pair['a']).name} vs {Path(pair['b']).name}: {pair['agreement']:.2%}")


def _print_json_task(result: dict) -> None:
    click.echo(f"model       {result['model']}")
    click.echo(f"n           {result['n']}")
    for field, rate in result["field_exact"].items():
        click.echo(f"{field:<11} {rate:.2%} exact")
    click.echo(f"all fields  {result['all_fields']:.2%}")
    click.echo(f"valid       {result['valid']:.2%}")
    click.echo(f"latency     p50 {result['p50_ms']:.1f} ms  p90 {result['p90_ms']:.1f} ms")


def _run(name: str, spec: TaskSpec, settings: Settings, file: Path, models: tuple[Path, ...], split: str,
         limit: int | None, language: str | None, progress) -> tuple[dict, Callable[[dict], None]]:
    lang = None if language in (None, "auto") else language
    if spec.output == "json":
        if len(models) != 1:
            raise click.UsageError("a JSON task is evaluated on one --model at a time")
        cases = read_json_cases(file, split, limit)
        return evaluate_json(models[0], name, cases, settings, lang, progress(str(models[0]))), _print_json_task
    examples = select(read_tsv(file, set(spec.label_ids)), split, limit)
    if not examples:
        raise DatasetError(f"{file}: no rows in split {split!r}")
    return evaluate(models, examples, settings, lang, progress, spec.label_ids, name), _print_labels


def _task_command(name: str) -> click.Command:
    @click.command(name)
    @click.argument("file", type=click.Path(path_type=Path))
    @click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
                  help="GGUF file; repeat to compare several (label tasks).")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N rows (of the split).")
    @click.option("--language", type=click.Choice(["auto", "en", "zh"]), default=None,
                  help="Prompt language; default: the configured one (auto = per text).")
    @click.option("--split", type=click.Choice(SPLITS), default="all", show_default=True,
                  help="'tune' = the ~30 % of rows used for prompt tuning (hash of the text), 'heldout' = the rest.")
    @click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
    @click.option("--quiet", is_flag=True, help="No progress on stderr.")
    def command(file: Path, models: tuple[Path, ...], as_json: bool, limit: int | None, language: str | None,
                split: str, config_file: Path | None, quiet: bool) -> None:
        for m in models:
            if not m.is_file():
                raise click.ClickException(f"model file not found: {m}")
        with friendly_errors(ValueError):  # besides the user errors: refusals of the evaluation's options
            settings = load_settings(config_file, prompts={"language": language})
            folder = settings.prompts.dir / "tasks" / name
            if not folder.is_dir():
                raise PromptError(f"no task named {name!r} in {settings.prompts.dir / 'tasks'}")
            spec = load_task(folder, settings.prompts.neutral, settings.prompts.few_shot,
                             settings.prompts.max_text_tokens)
            result, show = _run(name, spec, settings, file, models, split, limit, language,
                                _progress_factory(not quiet and not as_json))
        if as_json:
            click.echo(json.dumps(result, ensure_ascii=False))
        else:
            show(result)
    command.help = f"Evaluate the {name!r} task on FILE (label tasks: TSV text<TAB>label; JSON tasks: JSONL)."
    return command


@eval_group.command("tools")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="GGUF file.")
@click.option("--homes", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of recorded homes (default: homes/ next to FILE).")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Argument rules file (default: prompts/tools/argument_values.toml), to compare variants.")
@click.option("--no-rules", is_flag=True, help="No argument rules: the model writes any value the schema allows.")
@click.option("--no-routing", is_flag=True,
              help="No tool routing (prompts/tools/routing.toml): the model decides alone.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (default: the configured one).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed, for repeatable runs.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N cases.")
@click.option("--split", type=click.Choice(SPLITS), default="all", show_default=True,
              help="'tune' = the ~30 % of cases rules and routing are tuned on (hash of the id), 'heldout' = the rest.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Use every N-th case (a sample across homes, languages and categories, to compare variants).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def tools(file: Path, model_path: Path, homes: Path | None, rules_file: Path | None, no_rules: bool,
          no_routing: bool, temperature: float | None, seed: int,
          limit: int | None, split: str, every: int, config_file: Path | None, as_json: bool) -> None:
    """Tool calls on Home Assistant's own prompts and tools: decision, tool name, arguments, validity."""
    from edge.engine.engine import Engine
    from edge.engine.tool_rules import ArgumentRules, load_rules
    from edge.engine.types import SamplingParams
    from edge.evaluation.tools_eval import evaluate, load_cases, load_homes
    with friendly_errors(ValueError):  # besides the user errors: Engine.load's refusal of the settings
        settings = load_settings(config_file)
        recorded = load_homes(homes or file.parent / "homes")
        cases = load_cases(file, recorded, split)[::every][:limit]
        engine = Engine.load(model_path, settings)
    try:
        if no_rules or rules_file is not None:
            engine.chat.rules = load_rules(rules_file) if rules_file is not None else ArgumentRules()
        if no_routing:
            engine.routing = None
        result = evaluate(engine, cases, recorded, SamplingParams(temperature=temperature, seed=seed),
                          progress=_progress_factory(not as_json)("tools"))
    finally:
        engine.close()
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    for name, row in [("all", result["all"]), *result["by_language"].items()]:
        click.echo(f"{name:4} n={row['n']:3} decision {row['decision_accuracy']:.1%}  tool name "
                   f"{row['tool_name_accuracy'] or 0:.1%}  arguments {row['argument_accuracy'] or 0:.1%}  "
                   f"chit-chat in text {row['chitchat_in_text'] or 0:.1%}  invalid {row['invalid_outputs']}  "
                   f"latency p50 {row['latency_p50_ms']:.0f} ms p90 {row['latency_p90_ms']:.0f} ms")
    for category, rate in result["by_category"].items():
        click.echo(f"  {category:16} {rate:.1%}")


@eval_group.command("chat")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="GGUF file.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (default: the configured one).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed, for repeatable runs.")
@click.option("--split", type=click.Choice(SPLITS), default="all", show_default=True,
              help="'tune' = the ~30 % of conversations used for tuning (hash of the id), 'heldout' = the rest.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N conversations.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, every reply included.")
def chat(file: Path, model_path: Path, temperature: float | None, seed: int, split: str, limit: int | None,
         config_file: Path | None, as_json: bool) -> None:
    """Free-text replies to the conversations of FILE: in the user's language, refusals, parroting,
    empty or truncated, length, TTFT, tokens/s (definitions: edge/evaluation/chat_eval.py)."""
    from edge.engine.engine import Engine
    from edge.engine.types import SamplingParams
    from edge.evaluation.chat_eval import evaluate, load_cases
    if not model_path.is_file():
        raise click.ClickException(f"model file not found: {model_path}")
    with friendly_errors(ValueError):  # besides the user errors: Engine.load's refusal of the settings
        settings = load_settings(config_file)
        cases = load_cases(file, split, limit)
        engine = Engine.load(model_path, settings)
    try:
        result = evaluate(engine, cases, SamplingParams(temperature=temperature, seed=seed),
                          progress=_progress_factory(not as_json)("chat"))
    finally:
        engine.close()
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    rows = [("all", result["all"]), *result["by_language"].items(), *result["by_category"].items()]
    for name, row in rows:
        click.echo(f"{name:10} n={row['n']:3}  in language {row['in_language_rate']:.1%}  refusals "
                   f"{row['refusals']}  verbatim {row['verbatim']}  near-verbatim {row['near_verbatim']}  "
                   f"empty {row['empty']}  truncated {row['truncated']}  median {row['median_chars']:.0f} chars  "
                   f"TTFT p50 {row['ttft_p50_ms']:.0f} ms  {row['tokens_per_s_p50']:.1f} tok/s")
