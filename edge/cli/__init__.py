"""The `qwen-edge` command: a thin layer that parses, calls the library and prints.

Subcommands live in their own modules and are imported only when used (edge/cli/lazy.py), so
`qwen-edge doctor` does not pay for importing the HTTP stack.
"""
from __future__ import annotations

import logging
import sys

import click

from edge import __version__
from edge.cli.lazy import LazyGroup

# command name -> "module:attribute"; a new command is one more row.
COMMANDS: dict[str, str] = {
    "convert": "edge.cli.convert_cmd:convert",
    "classify": "edge.cli.engine_cmd:classify",
    "run": "edge.cli.engine_cmd:run",
    "tasks": "edge.cli.engine_cmd:tasks",
    "chat": "edge.cli.engine_cmd:chat",
    "eval": "edge.cli.eval_cmd:eval_group",
    "bench": "edge.cli.bench_cmd:bench",
    "serve": "edge.cli.serve_cmd:serve",
    "doctor": "edge.cli.doctor_cmd:doctor",
    "config": "edge.cli.config_cmd:config",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS)
@click.version_option(__version__, prog_name="qwen-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Qwen All-in-One Edge: one small model, tasks (sentiment, emotion, ...) + chat, offline."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Entry point: user-facing errors (``click.ClickException``) print one line and exit non-zero."""
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
