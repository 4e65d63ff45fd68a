"""What clients are told about the served model file (Ollama's /api/tags and /api/show, /health)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from edge.model.gguf_check import GGUFInfo


def model_facts(info: GGUFInfo) -> dict:
    """What clients are told about the model file (Ollama's /api/tags and /api/show, /health)."""
    stat = info.path.stat()
    n = info.n_params
    return {
        "path": str(info.path), "file_type": info.file_type, "arch": info.arch, "size_bytes": info.size_bytes,
        "n_params": n, "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
        "n_ctx_train": info.n_ctx_train, "n_layer": info.n_layer, "n_embd": info.n_embd,
        # a cheap stable id (hashing 400 MB at every start would cost seconds on a Pi)
        "digest": hashlib.sha256(f"{info.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest(),
        "modified_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
    }
