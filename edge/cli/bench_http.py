"""`qwen-edge bench http`: parse, call ``edge.evaluation.bench_http`` and print its tables.

Phases: sentiment latency / decode / RSS when ``--texts FILE`` is given (a labelled TSV: there is
no default set, the figures and the accuracy mean something only for the set you name);
``--concurrency 1,2,4``; ``--mixed`` (its classification texts are a fixed built-in set of short
English sentences, the prompt the peer is given). See the library module for what is measured.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click


def _counts(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        counts = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("use stream counts separated by commas, e.g. 1,2,4") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("stream counts must be 1 or more")
    return counts


def _fmt(v: object) -> str:
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:g} ({v['min']:g}-{v['max']:g})" if v["min"] != v["max"] else f"{v['median']:g}"
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _table(title: str, cols: tuple[str, ...], rows: list[dict]) -> None:
    click.echo(title)
    cells = [list(cols)] + [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    for r in cells:
        click.echo("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _rows(phase: dict) -> list[dict]:
    return [{"server": name, **figures} for name, figures in phase["servers"].items()]


def _ratios(r: dict | None) -> str:
    if not r:
        return ""
    return "  ours/peer: " + ", ".join(f"{k} {v['median']:g} {v['per_repetition']}" for k, v in r.items() if v)


def _print(report: dict) -> None:
    from edge.evaluation.bench_http import TARGETS
    if "results" in report:
        _table("sentiment under chat, decode, RSS", ("server", "texts", "p50_ms", "p90_ms", "accuracy",
                                                     "decode_tps", "rss_peak_mb", "rss_end_mb"), report["results"])
        if report.get("targets_met"):
            verdicts = {True: "met", False: "MISSED", None: "n/a"}
            click.echo("targets: " + ", ".join(f"{k} {TARGETS[k]}: {verdicts[ok]}"
                                               for k, ok in report["targets_met"].items()))
    cols = ("server", "aggregate_tps", "per_stream_tps_median", "ttft_p50_ms", "ttft_p90_ms", "tokens_per_stream",
            "rss_peak_mb", "other_cpu_share")
    for row in report.get("concurrency", []):
        _table(f"{row['streams']} concurrent stream(s), {report['chat_tokens']} tokens each", cols, _rows(row))
        click.echo(_ratios(row.get("ratio_ours_over_peer")))
    if "mixed" in report:
        m = report["mixed"]
        _table(f"mixed: {m['chat_streams']} chats + classification back to back, {m['window_s']:g} s window",
               ("server", "chat_aggregate_tps", "classifications", "classify_p50_ms", "classify_p90_ms", "errors",
                "rss_peak_mb", "other_cpu_share"), _rows(m))
        click.echo(_ratios(m.get("ratio_ours_over_peer")))
    click.echo(f"load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}; "
               f"{report['cpu_count']} CPUs; other_cpu_share: the machine's CPU used by other processes in a turn")


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


@click.command("http")
@click.option("--url", default=None, help="Running daemon to measure (default http://127.0.0.1:11434).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start `qwen-edge serve --model M` for each turn instead of using --url "
                   "(then the two servers are never loaded at once).")
@click.option("--api-key", envvar="QWEN_EDGE_SERVER__API_KEY", default=None, help="Bearer key of the daemon.")
@click.option("--peer-server", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="llama.cpp `llama-server` binary (scripts/build_llama_server.sh): same work, same model file.")
@click.option("--peer-ctx", type=click.IntRange(min=64), default=None,
              help="llama-server context per slot [default: the daemon's n_ctx].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="llama-server threads [default: as the daemon resolves model.n_threads].")
@click.option("--peer-arg", "peer_args", multiple=True, help="Extra llama-server argument (repeatable), "
              "e.g. --peer-arg=--load-mode --peer-arg=none.")
@click.option("--texts", "texts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labelled TSV (text<TAB>label): runs the sentiment-latency phase on its first --limit rows.")
@click.option("--limit", default=200, show_default=True, help="Texts to classify.")
@click.option("--chat-streams", default=1, show_default=True, help="Replies streaming during the sentiment run.")
@click.option("--chat-tokens", default=128, show_default=True, type=click.IntRange(min=2),
              help="max_tokens of every measured reply.")
@click.option("--rounds", default=5, show_default=True, help="Sentiment phase: rounds alternating the servers.")
@click.option("--concurrency", callback=_counts, default=None,
              help="Concurrent streamed replies, e.g. 1,2,4: aggregate and per-stream tok/s, TTFT.")
@click.option("--mixed", is_flag=True, help="2 chat streams while one client classifies back to back.")
@click.option("--window", default=30.0, show_default=True, type=click.FloatRange(min=1), help="Mixed: seconds.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Concurrency and mixed: repetitions (turns alternate between the servers).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure here.")
def bench_http(url: str | None, model: Path | None, api_key: str | None, peer_server: Path | None,
               peer_ctx: int | None, threads: int | None, peer_args: tuple[str, ...], texts_file: Path | None,
               limit: int, chat_streams: int, chat_tokens: int, rounds: int, concurrency: tuple[int, ...],
               mixed: bool, window: float, repeat: int, json_out: Path | None) -> None:
    """The daemon over HTTP, optionally side by side with llama-server: sentiment latency under chat,
    decode speed and RSS (--texts), concurrent streams (--concurrency), mixed load (--mixed)."""
    from edge.cli.common import friendly_errors, settings_from
    from edge.evaluation.bench_http import HttpBenchOptions, PeerOptions, run_http_bench
    from edge.evaluation.datasets import read_tsv
    from edge.evaluation.http_servers import OursSpec

    if texts_file is None and not concurrency and not mixed:
        raise click.UsageError("nothing to measure: give --texts FILE.tsv, --concurrency N[,N...] or --mixed")
    settings = settings_from(None)
    with friendly_errors():
        texts = tuple((e.text, e.label) for e in read_tsv(texts_file))[:limit] if texts_file else ()
    opts = HttpBenchOptions(
        ours=OursSpec(model, url, api_key),
        peer=PeerOptions(peer_server, peer_ctx, threads, peer_args) if peer_server else None,
        prompts_dir=settings.prompts.dir, n_threads=settings.model.n_threads,
        chat_system=(settings.prompts.dir / "chat" / "en" / "system.txt").read_text(encoding="utf-8").strip(),
        texts=texts, chat_streams=chat_streams, chat_tokens=chat_tokens, rounds=rounds, concurrency=concurrency,
        mixed=mixed, mixed_window_s=window, repeat=repeat)
    with friendly_errors():
        report = run_http_bench(opts)
    _print(report)
    if json_out is not None:
        _write_json(json_out, report)
