"""Shared fixtures. Conversion fixtures first: the tiny model is built and converted once per session
with the real converter. Other areas append their fixtures below."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers import as top-level modules

from tiny_checkpoint import TinyCheckpoint, TinySpec, build_tiny_checkpoint  # noqa: E402

STANDIN_ENV = "QWEN_EDGE_STANDIN_GGUF"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """The default tiny HF folder (Qwen1.5-like: MHA, untied, F32) with its exact weights."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf"), TinySpec())


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint.path


@pytest.fixture(scope="session")
def tiny_gguf_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """Output folder of one real conversion: tiny-f32.gguf, tiny-q8_0.gguf, tiny-q4_k_m.gguf, manifest.json."""
    from edge.convert.pipeline import ConvertRequest, run_conversion

    out = tmp_path_factory.mktemp("tiny_gguf")
    run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="tiny"))
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_dir) -> Path:
    return tiny_gguf_dir / "tiny-f32.gguf"


@pytest.fixture(scope="session")
def tiny_gguf_q8(tiny_gguf_dir) -> Path:
    return tiny_gguf_dir / "tiny-q8_0.gguf"


@pytest.fixture(scope="session")
def tiny_gguf_q4(tiny_gguf_dir) -> Path:
    return tiny_gguf_dir / "tiny-q4_k_m.gguf"


@pytest.fixture(scope="session")
def standin_gguf() -> Path:
    """The real Qwen2-family stand-in GGUF, or skip."""
    path = os.environ.get(STANDIN_ENV)
    if not path or not Path(path).is_file():
        pytest.skip(f"{STANDIN_ENV} not set or file absent")
    return Path(path)


# -- engine fixtures (shared engine over the tiny model) ------------------------------------------
from tests.engine_fixtures import engine  # noqa: E402,F401
