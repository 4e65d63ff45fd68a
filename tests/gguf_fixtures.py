"""A small header-valid qwen2 GGUF for the model-file tests (checked, never run by llama.cpp)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

N_EMBD, N_VOCAB, N_LAYER = 64, 40, 2
REQUIRED = ("context_length", "embedding_length", "block_count", "head_count", "head_count_kv", "tokens")


def write_tiny_gguf(path: Path, arch: str = "qwen2", skip: tuple[str, ...] = (), layers: int = N_LAYER,
                    embd_rows: int = N_VOCAB) -> Path:
    """A small header-valid qwen2-style GGUF (not meant to be run, only checked).

    ``layers`` and ``embd_rows`` let a test write tensors that disagree with block_count (N_LAYER)
    and the vocabulary (N_VOCAB)."""
    w = GGUFWriter(str(path), arch)
    setters = {
        "context_length": lambda: w.add_context_length(512),
        "embedding_length": lambda: w.add_embedding_length(N_EMBD),
        "block_count": lambda: w.add_block_count(N_LAYER),
        "head_count": lambda: w.add_head_count(4),
        "head_count_kv": lambda: w.add_head_count_kv(2),
        "tokens": lambda: w.add_token_list([f"tok{i}" for i in range(N_VOCAB)]),
    }
    for name, setter in setters.items():
        if name not in skip:
            setter()
    w.add_feed_forward_length(128)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((embd_rows, N_EMBD), dtype=np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        q = quantize(rng.standard_normal((N_EMBD, N_EMBD), dtype=np.float32), GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.attn_q.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
