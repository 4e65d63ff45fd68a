"""The README's configuration table is the one `qwen-edge config --docs` prints from the code."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edge.cli.config_cmd import config, settings_table
from edge.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_table_is_the_generated_one(monkeypatch):
    for name in ("XDG_DATA_HOME", "STATE_DIRECTORY"):  # the README shows a plain user's defaults
        monkeypatch.delenv(name, raising=False)
    table = settings_table()
    assert table in README.read_text(encoding="utf-8"), "README config table is stale: paste `qwen-edge config --docs`"


def test_every_option_has_a_row_and_the_cli_prints_it():
    out = CliRunner().invoke(config, ["--docs"]).output
    for section, field in Settings.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"`[{section}] {name}`" in out
    assert "<project>/prompts" in out and "/work/" not in out
