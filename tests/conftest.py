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
HA_VENV_ENV = "QWEN_EDGE_HA_VENV"
# Variables that select real resources of this machine (a model file, the Home Assistant venv) are
# kept; every other QWEN_EDGE_* variable (a developer's configuration) is cleared for the tests.
KEEP_ENV = (STANDIN_ENV, HA_VENV_ENV)
# Where settings.py (and systemd) put the user's models, states and caches: a temp dir in tests.
USER_DIRS = ("XDG_DATA_HOME", "XDG_CACHE_HOME", "STATE_DIRECTORY", "CACHE_DIRECTORY")


def _isolate(mp: pytest.MonkeyPatch, root: Path) -> None:
    for name in [k for k in os.environ if k.startswith("QWEN_EDGE_") and k not in KEEP_ENV]:
        mp.delenv(name)
    for name in USER_DIRS:
        mp.setenv(name, str(root / name.lower()))


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """Session fixtures (the converted tiny model, the shared engine) run isolated too. The cached
    Home Assistant venv is looked up first, where scripts/ha_env.sh keeps it (the user's cache)."""
    if not os.environ.get(HA_VENV_ENV):
        from home_assistant import ha_venv
        found, _ = ha_venv()
        if found is not None:
            os.environ[HA_VENV_ENV] = str(found)
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("user_dirs"))
        yield


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test: no QWEN_EDGE_* configuration from the caller's environment, and the user's data
    and cache folders in its own temp dir."""
    _isolate(monkeypatch, tmp_path / "_user_dirs")


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
