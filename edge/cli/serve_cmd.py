"""`qwen-edge serve`: parse flags, then hand over to edge.daemon.server."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from edge.cli.common import setting_option


@click.command("serve")
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="GGUF file, or a Hugging Face model folder (converted first). Default: model.path / model.dir.")
@setting_option("server.host")
@setting_option("server.port")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML config file (default: $QWEN_EDGE_CONFIG).")
def serve(model: Path | None, host: str | None, port: int | None, config_file: Path | None) -> None:
    """Run the HTTP daemon: native, OpenAI- and Ollama-compatible API, /health, /metrics, chat page."""
    from edge.cli.common import friendly_errors
    from edge.daemon.server import run
    from edge.settings import load_settings

    overrides = {"server": {"host": host, "port": port}}
    edge_log = logging.getLogger("edge")
    if edge_log.getEffectiveLevel() > logging.INFO:
        edge_log.setLevel(logging.INFO)  # a daemon's start, stop and refusals belong in the journal
    with friendly_errors():
        settings = load_settings(config_file, **overrides)
        code = run(settings, model, reload_settings=lambda: load_settings(config_file, **overrides),
                   progress=sys.stderr.isatty())
    sys.exit(code)
