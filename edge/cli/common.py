"""Shared CLI plumbing: settings + model resolution + user-facing errors, in one place."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from edge.settings import Settings, SettingsError, load_settings

config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                             default=None, help="TOML configuration file (default: $QWEN_EDGE_CONFIG).")
model_option = click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
                            help="GGUF file (default: the configured model folder).")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: printed as one line, exit code 1."""
    from edge.engine.bulk import BulkInputError
    from edge.engine.chat import ContextOverflow
    from edge.engine.engine import TaskUnavailable
    from edge.engine.grammar import GrammarError
    from edge.engine.runtime import RuntimeError_
    from edge.engine.task_runner import InputError, OutputLimit
    from edge.engine.tasks import PromptError
    from edge.engine.tools import ToolError
    from edge.model.gguf_check import ModelFileError
    from edge.model.locate import ModelNotFound
    return (SettingsError, PromptError, ModelFileError, ModelNotFound, InputError, ContextOverflow,
            BulkInputError, RuntimeError_, OSError, TaskUnavailable, GrammarError, ToolError, OutputLimit)


@contextmanager
def friendly_errors() -> Iterator[None]:
    try:
        yield
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from None


def settings_from(config_file: Path | None, **overrides: dict) -> Settings:
    try:
        return load_settings(config_file, **overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def open_engine(settings: Settings, model_path: Path | None):
    from edge.engine.engine import Engine
    from edge.model.locate import find_model
    with friendly_errors():
        return Engine.load(find_model(settings, model_path), settings)
