"""`qwen-edge serve`: parse flags, then hand over to edge.daemon.server."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


@click.command("serve")
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="GGUF file, or a Hugging Face model folder (converted first). Default: model.path / model.dir.")
@click.option("--host", default=None, help="Bind address (default localhost: 127.0.0.1 and ::1; non-loopback needs an API key).")
@click.option("--port", type=int, default=None, help="Port (default 11434, Ollama's).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML config file (default: $QWEN_EDGE_CONFIG).")
def serve(model: Path | None, host: str | None, port: int | None, config_file: Path | None) -> None:
    """Run the HTTP daemon: native, OpenAI- and Ollama-compatible API, /health, /metrics, chat page."""
    from edge.api.security import InsecureBind
    from edge.daemon.model_source import ModelUnavailable
    from edge.daemon.server import run
    from edge.model.gguf_check import ModelFileError
    from edge.settings import SettingsError, load_settings

    overrides = {"server": {"host": host, "port": port}}
    edge_log = logging.getLogger("edge")
    if edge_log.getEffectiveLevel() > logging.INFO:
        edge_log.setLevel(logging.INFO)  # a daemon's start, stop and refusals belong in the journal
    try:
        settings = load_settings(config_file, **overrides)
        code = run(settings, model, reload_settings=lambda: load_settings(config_file, **overrides),
                   progress=sys.stderr.isatty())
    except (SettingsError, InsecureBind, ModelUnavailable, ModelFileError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
