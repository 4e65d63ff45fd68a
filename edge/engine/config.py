"""The one description of a llama.cpp model load and context, from the settings.

Pure Python (no llama.cpp import): `doctor` builds one in its own process and hands it to the
measuring child (measure.py), which loads the model with the engine's code (runtime.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from edge.model.gguf_check import GGUFInfo
from edge.model.preflight import context_options, resolve_kv_cache_type
from edge.settings import Settings


@dataclass(frozen=True)
class RuntimeConfig:
    """What shapes the model load and the context: the engine, the memory measurement (measure.py)
    and the raw baseline (evaluation/raw_llama.py) all build theirs from it with
    `runtime.load_model` and `runtime.context_params`."""
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 256             # capped at n_batch
    n_threads: int = 0              # 0: one per physical core
    n_seq_max: int = 16
    kv_cache_type: str = "q8_0"     # a key of runtime.KV_CACHE_TYPES
    flash_attn: bool | None = True  # None: llama.cpp's own choice (the raw baseline's default run)
    mmap: bool = False


def runtime_config(info: GGUFInfo, settings: Settings, kv_cache_type: str | None = None) -> RuntimeConfig:
    """The RuntimeConfig of the model settings for the file `info` describes (KV cache type and
    mmap resolved as preflight does, unless `kv_cache_type` is given)."""
    m = settings.model
    kv = kv_cache_type or resolve_kv_cache_type(info, settings)
    return RuntimeConfig(n_ctx=m.n_ctx, n_threads=m.n_threads, kv_cache_type=kv, **context_options(m, info))
