"""`qwen-edge bench --model M --short-file S.tsv --long-file L.tsv [--json]`: engine vs naive
llama-cpp-python vs the llama.cpp floor.

`qwen-edge bench http ...` and `bench load` (the HTTP harnesses) are its subcommands.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from edge.cli.common import friendly_errors
from edge.cli.lazy import LazyGroup
from edge.evaluation.bench import BenchOptions, run_bench
from edge.settings import load_settings

SUBCOMMANDS = {"http": "edge.cli.bench_http:bench_http", "load": "edge.cli.bench_load:bench_load",
               "task": "edge.cli.bench_task:bench_task"}


def _print_human(r: dict) -> None:
    rows = [("sentiment p50 / p90 / p99 (ms)",
             f"{r['sentiment_p50_ms']:.0f} / {r['sentiment_p90_ms']:.0f} / {r['sentiment_p99_ms']:.0f}"),
            ("naive p50 / p90 / p99 (ms)",
             f"{r['naive_sentiment_p50_ms']:.0f} / {r['naive_sentiment_p90_ms']:.0f} / "
             f"{r['naive_sentiment_p99_ms']:.0f}"),
            ("floor p50 / p90 (ms)", f"{r['floor_sentiment_p50_ms']:.0f} / {r['floor_sentiment_p90_ms']:.0f}"),
            ("p50 / floor p50", f"{r['p50_vs_floor']:.3f}"),
            ("naive p90 / engine p90", f"{r['naive_p90_over_engine_p90']:.2f}x"),
            ("bulk items/s (prefill bound)",
             f"{r['bulk_items_per_s']:.2f} ({r['prefill_bound_items_per_s']:.2f}, "
             f"ratio {r['bulk_vs_prefill_bound']:.3f})"),
            ("chat TTFT (ms)", f"{r['chat_ttft_ms']:.0f}"),
            ("chat decode / raw decode (tok/s)",
             f"{r['chat_decode_tps']:.1f} / {r['raw_decode_tps']:.1f} (ratio {r['chat_decode_vs_raw']:.3f})"),
            ("peak RSS (MB)", f"{r['peak_rss_mb']:.0f}")]
    for name, value in rows:
        click.echo(f"{name:<36} {value}")
    for part in ("short", "long"):
        s = r.get(part)
        if s:
            click.echo(f"{part:<5} n={s['n']} tokens~{s['mean_tokens']:.0f}: p50 {s['sentiment_p50_ms']:.0f} ms "
                       f"(floor {s['floor_sentiment_p50_ms']:.0f}, naive {s['naive_sentiment_p50_ms']:.0f}), "
                       f"p90 {s['sentiment_p90_ms']:.0f} ms (naive {s['naive_sentiment_p90_ms']:.0f})")


@click.group("bench", cls=LazyGroup, lazy_commands=SUBCOMMANDS, invoke_without_command=True)
@click.option("--model", type=click.Path(path_type=Path), help="GGUF file to benchmark.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--short-file", type=click.Path(path_type=Path), default=None,
              help="Required: TSV of short texts (text<TAB>label), e.g. SST-2 dev.")
@click.option("--long-file", type=click.Path(path_type=Path), default=None,
              help="Required: TSV of long texts, e.g. ChnSentiCorp test; rows shorter than 120 characters are skipped.")
@click.option("--n-short", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--n-long", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--n-bulk", type=click.IntRange(min=1), default=32, show_default=True, help="Texts for the bulk run.")
@click.option("--chat-turns", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat-max-tokens", type=click.IntRange(min=2), default=48, show_default=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML settings file.")
@click.pass_context
def bench(ctx: click.Context, model: Path | None, as_json: bool, short_file: Path | None, long_file: Path | None,
          n_short: int, n_long: int, n_bulk: int, chat_turns: int, chat_max_tokens: int,
          config_file: Path | None) -> None:
    """Sentiment latency (chat interleaved), bulk throughput, chat speed and memory, side by side."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        raise click.UsageError("--model is required")
    if short_file is None or long_file is None:  # no default: the figures mean something only for the set named
        raise click.UsageError("--short-file and --long-file are required (labelled TSVs; BENCHMARKS.md names the "
                               "sets its figures were measured on)")
    if not model.is_file():
        raise click.ClickException(f"model file not found: {model}")
    opts = BenchOptions(short_file, long_file, n_short, n_long, n_bulk, chat_turns, chat_max_tokens)
    say = None if as_json else (lambda msg: click.echo(f"bench: {msg}", err=True))
    with friendly_errors():
        settings = load_settings(config_file)
        result = run_bench(model, settings, opts, say)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        _print_human(result)
