"""`qwen-edge config`: the effective configuration, or (--docs) the table the README shows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import click
from pydantic import BaseModel

from edge.cli.common import config_option, settings_from
from edge.settings import PROJECT_ROOT, Settings


def settings_table() -> str:
    """Markdown table of every option: TOML key, environment variable, default, description."""
    rows = ["| TOML `[section] key` | environment | default | meaning |", "|---|---|---|---|"]
    for section, field in Settings.model_fields.items():
        model = cast("type[BaseModel]", field.annotation)  # every section is a model
        for name, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            if isinstance(default, Path):  # machine-independent: the README shows this table
                default = str(default).replace(str(PROJECT_ROOT), "<project>").replace(str(Path.home()), "~")
            env = f"QWEN_EDGE_{section.upper()}__{name.upper()}"
            rows.append(f"| `[{section}] {name}` | `{env}` | `{json.dumps(default, default=str, ensure_ascii=False)}` "
                        f"| {f.description or ''} |")
    return "\n".join(rows)


@click.command()
@click.option("--docs", is_flag=True, help="Print the Markdown table of all options.")
@config_option
def config(docs: bool, config_file: Path | None) -> None:
    """Show the effective configuration (defaults < TOML < environment)."""
    if docs:
        click.echo(settings_table())
        return
    settings = settings_from(config_file)
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2, ensure_ascii=False))
