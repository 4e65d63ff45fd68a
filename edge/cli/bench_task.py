"""`qwen-edge bench task NAME --model M --texts FILE`: a task's latency against the llama.cpp floor,
and prefix restore against recompute (edge/evaluation/task_bench.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edge.cli.common import friendly_errors, settings_from


@click.command("task")
@click.argument("name")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF file to benchmark.")
@click.option("--texts", "texts_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TSV with a `text` column (or one text a line), or JSONL ({\"text\": ...} per line).")
@click.option("--limit", default=40, show_default=True, type=click.IntRange(min=1), help="Texts to time.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Restore / recompute pairs per prefix.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_task(name: str, model_path: Path, texts_file: Path, limit: int, rounds: int, config_file: Path | None,
               as_json: bool) -> None:
    """Latency of task NAME vs the prefill floor; restoring an evicted prefix vs evaluating it."""
    from edge.engine.bulk import read_texts
    from edge.evaluation.datasets import DatasetError
    from edge.evaluation.task_bench import run_task_bench
    from edge.evaluation.task_eval import read_json_cases
    settings = settings_from(config_file)
    with friendly_errors():
        try:
            rows = ([c.text for c in read_json_cases(texts_file)] if texts_file.suffix == ".jsonl"
                    else read_texts(texts_file))
        except DatasetError as exc:
            raise click.ClickException(str(exc)) from None
    with friendly_errors():
        result = run_task_bench(model_path, settings, name, rows[:limit], rounds)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    click.echo(f"{name}: n={result['n']}  p50 {result['p50_ms']:.0f} ms (floor {result['floor_p50_ms']:.0f}, "
               f"ratio {result['p50_vs_floor']:.3f})  p90 {result['p90_ms']:.0f} ms "
               f"(floor {result['floor_p90_ms']:.0f}); floor after the prefix p50 "
               f"{result['floor_after_prefix_p50_ms']:.0f} ms (ratio {result['p50_vs_floor_after_prefix']:.3f}; "
               f"bare llama.cpp after the prefix ÷ empty-cache floor {result['prefix_floor_vs_floor']:.3f})")
    for lang, row in result["prefix"].items():
        click.echo(f"  prefix {lang}: {row['prefix_tokens']} tokens, restore {row['restore_ms']:.1f} ms, "
                   f"recompute {row['recompute_ms']:.0f} ms ({row['restore_vs_recompute']:.3f}x)")
