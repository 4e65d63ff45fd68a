"""Shared CLI plumbing: settings + model resolution + user-facing errors, in one place."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin

import click
from pydantic import BaseModel

from edge.settings import Settings, load_settings

FC = TypeVar("FC", bound=Callable[..., Any])

def _click_type(annotation: Any) -> click.ParamType:
    """The click type of a setting's annotation: Literal -> choice, Path, int, float, str."""
    if get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    return {Path: click.Path(path_type=Path), int: click.INT, float: click.FLOAT}.get(annotation, click.STRING)


def setting_option(setting: str, *param_decls: str, **attrs: Any) -> Callable[[FC], FC]:
    """A flag that overrides one setting ("section.name"), typed and documented by the settings model
    (as llama-cpp-python's `add_args_from_model` does). It has no default, so a missing flag leaves the
    configured value in force; the command passes it on as an override to `load_settings`, which
    validates it like any other source."""
    section, name = setting.split(".")
    model = cast("type[BaseModel]", Settings.model_fields[section].annotation)
    field = model.model_fields[name]
    attrs.setdefault("type", _click_type(field.annotation))
    attrs.setdefault("help", f"{field.description} (setting [{section}] {name}).")
    return click.option(*(param_decls or (f"--{name.replace('_', '-')}",)), default=None, **attrs)


config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                             default=None, help="TOML configuration file (default: $QWEN_EDGE_CONFIG).")
model_option = click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
                            help="GGUF file (default: the configured model folder).")


# Exceptions whose message is meant for the user, as "module:Class" (subclasses count too): printed as
# one line with exit code 1 by `friendly_errors`, for every command. A table of names, so that naming
# one imports nothing (doctor never imports llama.cpp); a new user-facing error is one more row.
USER_ERRORS = (
    "builtins:OSError",
    "edge.settings:SettingsError",
    "edge.model.gguf_check:ModelFileError",          # and ModelDoesNotFit
    "edge.model.locate:ModelNotFound",
    "edge.convert.errors:ConversionError",
    "edge.engine.tasks:PromptError",
    "edge.engine.task_runner:InputError",
    "edge.engine.task_runner:OutputLimit",
    "edge.engine.grammar:GrammarError",
    "edge.engine.tools:ToolError",
    "edge.engine.chat:ContextOverflow",
    "edge.engine.bulk:BulkInputError",
    "edge.engine.runtime:RuntimeError_",             # and KVCacheFull
    "edge.engine.engine:TaskUnavailable",
    "edge.evaluation.datasets:DatasetError",
    "edge.evaluation.tools_eval:ToolsDataError",
    "edge.evaluation.http_servers:ServerError",
    "edge.api.security:InsecureBind",
    "edge.daemon.model_source:ModelUnavailable",
    "httpx:HTTPError",
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The classes of USER_ERRORS that are loaded: one whose module was never imported cannot have
    been raised."""
    found = []
    for entry in USER_ERRORS:
        module, name = entry.split(":")
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


@contextmanager
def friendly_errors(*also: type[BaseException], prefix: str = "", one_line: bool = False) -> Iterator[None]:
    """The one error mapper of the CLI: a user-facing error (USER_ERRORS, or one of `also`) becomes
    ``click.ClickException(prefix + message)``; anything else propagates. ``one_line`` folds the
    message's white space (messages that quote a tool's output)."""
    try:
        yield
    except (*user_errors(), *also) as exc:
        if isinstance(exc, (click.ClickException, click.exceptions.Exit, click.Abort)):
            raise
        message = " ".join(str(exc).split()) if one_line else str(exc)
        raise click.ClickException(prefix + message) from None


def settings_from(config_file: Path | None, **overrides: dict) -> Settings:
    with friendly_errors():
        return load_settings(config_file, **overrides)


def open_engine(settings: Settings, model_path: Path | None):
    from edge.engine.engine import Engine
    from edge.model.locate import find_model
    with friendly_errors():
        return Engine.load(find_model(settings, model_path), settings)
