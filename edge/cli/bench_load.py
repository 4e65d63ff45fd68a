"""`qwen-edge bench load`: drive a running daemon with N concurrent clients and check every answer."""
from __future__ import annotations

import json

import click


def _mix(ctx: click.Context, param: click.Parameter, value: str) -> dict[str, int]:
    from edge.evaluation.load import ENDPOINTS
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, weight = part.partition("=")
        if name not in ENDPOINTS or not weight.isdigit():
            raise click.BadParameter(f"{part!r}: use NAME=WEIGHT with NAME in {', '.join(ENDPOINTS)}")
        mix[name] = int(weight)
    if not any(mix.values()):
        raise click.BadParameter("give at least one endpoint a weight above 0")
    return mix


def _print_human(r: dict) -> None:
    click.echo(f"{r['clients']} clients, {r['duration_s']} s against {r['url']} (model {r['model']}, "
               f"max_tokens {r['max_tokens']})")
    click.echo(f"{'endpoint':<12} {'sent':>6} {'answered':>8} {'503':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} "
               f"{'1st tok p50':>11} {'1st tok p99':>11}")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for name, s in r["endpoints"].items():
        click.echo(f"{name:<12} {s['sent']:>6} {s['answered']:>8} {s['rejected_503']:>6} {s['failed']:>6} "
                   f"{fmt(s['p50_ms']):>8} {fmt(s['p99_ms']):>8} {fmt(s['first_token_p50_ms']):>11} "
                   f"{fmt(s['first_token_p99_ms']):>11}")
        for reason, n in s["errors"].items():
            click.echo(f"    {n} x {reason}")
    click.echo(f"{'total':<12} {r['sent']:>6} {r['answered']:>8} {r['rejected_503']:>6} {r['failed']:>6}   "
               f"({r['requests_per_s']} answered/s)")
    click.echo(f"idle sentiment p50 / p99: {fmt(r['idle_sentiment_p50_ms'])} / {fmt(r['idle_sentiment_p99_ms'])} ms")
    click.echo(f"peak RSS: {r['peak_rss_mb']} MB (budget {r['budget_mb']} MB)")
    click.echo(f"every accepted request complete: {'yes' if r['all_accepted_complete'] else 'NO'}; "
               f"daemon after the run: {r['daemon_status_after']}")


@click.command("load")
@click.option("--url", default="http://127.0.0.1:11434", show_default=True, help="The running daemon.")
@click.option("--clients", "-c", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Concurrent clients (each sends one request at a time).")
@click.option("--duration", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to run (requests in flight when it ends are finished).")
@click.option("--requests", "max_requests", default=None, type=click.IntRange(1),
              help="Stop after this many requests in all, if sooner.")
@click.option("--mix", default="sentiment=2,ollama_chat=1,openai_chat=1", show_default=True, callback=_mix,
              help="How clients are shared out: sentiment, ollama_chat (streamed), openai_chat.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1), help="Reply length of each chat.")
@click.option("--api-key", envvar="QWEN_EDGE_API_KEY", default=None, help="Bearer key (or $QWEN_EDGE_API_KEY).")
@click.option("--pid", default=None, type=int, help="Daemon pid for RSS (default: the process on the port).")
@click.option("--sentiment-p99-bound", "p99_bound", default=None, type=float,
              help="Fail when sentiment p99 (ms) under this load exceeds it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_load(url: str, clients: int, duration: float, max_requests: int | None, mix: dict[str, int],
               max_tokens: int, api_key: str | None, pid: int | None, p99_bound: float | None,
               as_json: bool) -> None:
    """Load-test a running daemon over HTTP. Exit 1 when a request failed (503 refusals excepted),
    peak RSS went over the budget, or sentiment p99 went over --sentiment-p99-bound."""
    from edge.cli.common import friendly_errors
    from edge.evaluation.load import LoadOptions, report_failures, run_load

    opts = LoadOptions(url=url, clients=clients, duration_s=duration, max_requests=max_requests, mix=mix,
                       max_tokens=max_tokens, api_key=api_key, pid=pid)
    # besides the user errors: a daemon that is not ready (RuntimeError), a mix it cannot serve (ValueError)
    with friendly_errors(RuntimeError, ValueError, prefix=f"cannot load-test {url}: "):
        report = run_load(opts)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_human(report)
    problems = report_failures(report, p99_bound)
    if problems:
        raise click.ClickException("; ".join(problems))


