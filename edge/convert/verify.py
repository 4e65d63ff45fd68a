"""Open a written GGUF with llama.cpp and check it: tensor count, vocabulary, tokenizer round trip.

The tokenizer check loads only the vocabulary (``vocab_only``), so it costs milliseconds and no
weight memory. Both stop tokens must be end-of-generation for llama.cpp, or a chat could run on.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import llama_cpp
from llama_cpp._internals import LlamaModel

from edge.convert.errors import ConversionError

logger = logging.getLogger(__name__)

ROUND_TRIP_TEXTS = (
    "Hello, world! How are you today?",
    "今天天气很好，我们去公园散步吧。",
    "Mixed 中英文 text: 123 + 456 = 579.",
    "  leading spaces\nand\ttabs\n\n",
)


@dataclass(frozen=True)
class GgufCheck:
    tensor_count: int
    n_vocab: int
    file_type: int


# GGUF value type -> fixed size in bytes (8 = string, 9 = array are variable)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[vtype], 1)
    elif vtype == _STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif vtype == _ARRAY:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        raise ValueError(f"unknown metadata value type {vtype}")


def gguf_tensor_count(path: Path) -> int:
    """Walk the header (not gguf.GGUFReader: it builds an object per vocabulary string, ~0.5 GB for
    Qwen) and check that the last tensor's data fits in the file."""
    with open(path, "rb", buffering=1 << 20) as f:
        magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise ValueError("not a GGUF file")
        for _ in range(n_kv):
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            _skip_value(f, struct.unpack("<I", f.read(4))[0])
        last_offset = 0
        for _ in range(n_tensors):
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            (n_dims,) = struct.unpack("<I", f.read(4))
            f.seek(8 * n_dims + 4, 1)
            last_offset = max(last_offset, struct.unpack("<Q", f.read(8))[0])
        data_start = -(-f.tell() // 32) * 32
    if data_start + last_offset >= path.stat().st_size:
        raise ValueError("tensor data missing (file truncated)")
    return n_tensors


def verify_gguf(path: Path, expected_tensors: int, expected_vocab: int, stop_ids: dict[str, int]) -> GgufCheck:
    """Raise ConversionError naming `path` when a check fails."""
    try:
        tensor_count = gguf_tensor_count(path)
    except Exception as exc:  # gguf-py raises plain ValueError/struct errors on bad files
        raise ConversionError(f"{path}: unreadable GGUF ({exc})") from None
    if tensor_count != expected_tensors:
        raise ConversionError(f"{path}: {tensor_count} tensors, expected {expected_tensors}")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:  # the model without a context: vocabulary and metadata only
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except Exception as exc:
        raise ConversionError(f"{path}: llama.cpp cannot load it ({exc})") from None
    try:
        n_vocab = model.n_vocab()
        if n_vocab != expected_vocab:
            raise ConversionError(f"{path}: vocabulary of {n_vocab} tokens, expected {expected_vocab}")
        for text in ROUND_TRIP_TEXTS:
            ids = model.tokenize(text.encode(), add_bos=False, special=False)
            back = model.detokenize(ids).decode("utf-8", errors="replace")
            if back != text:
                raise ConversionError(f"{path}: tokenizer round trip changed {text!r} into {back!r}")
        for text, token_id in stop_ids.items():
            if not llama_cpp.llama_vocab_is_eog(model.vocab, token_id):
                raise ConversionError(f"{path}: {text} (id {token_id}) does not end generation in llama.cpp")
        file_type = llama_cpp.llama_model_ftype(model.model)
    finally:
        model.close()
    logger.info("verified %s: %d tensors, %d tokens", path, tensor_count, n_vocab)
    return GgufCheck(tensor_count=tensor_count, n_vocab=n_vocab, file_type=file_type)
