"""Settings and a shared engine over the tiny generated model (imported by conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge.settings import Settings, load_settings

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def tiny_settings(prompts_dir: Path = PROMPTS, engine: dict | None = None, **prompt_overrides) -> Settings:
    return load_settings(None,
                         model={"n_ctx": 4096, "n_batch": 256, "n_threads": 2},
                         prompts={"dir": prompts_dir, "max_text_tokens": 96, **prompt_overrides},
                         chat={"max_tokens": 16, "temperature": 0.0},
                         # the tiny tokenizer writes long prompts
                         engine={"prefix_tokens": 2048, **(engine or {})})


@pytest.fixture(scope="session")
def engine(tiny_gguf):
    from edge.engine.engine import Engine
    eng = Engine.load(tiny_gguf, tiny_settings())
    yield eng
    eng.close()
