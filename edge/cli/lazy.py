"""Click groups whose subcommands are imported only when used (click's lazy-group pattern), so
`qwen-edge doctor` does not pay for importing the HTTP stack."""
from __future__ import annotations

import importlib
from typing import Any

import click


class LazyGroup(click.Group):
    """A group with `lazy_commands`: command name -> "module:attribute", imported on first use.
    A module that is not there (an optional part left out) leaves its command out."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = self.lazy_commands.get(name)
        if target is None:
            return super().get_command(ctx, name)
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            return None
