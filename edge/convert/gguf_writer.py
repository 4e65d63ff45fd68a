"""Write the F32 GGUF: metadata and tensor table through gguf-py's GGUFWriter, data streamed.

GGUFWriter normally keeps every tensor until ``write_tensors_to_file``. We only declare the tensors
(``add_tensor_info``: name, shape, size), let it write header, key/values and tensor table, and then
append each tensor's data ourselves, chunk by chunk, in the declared order and alignment. Peak
memory is one chunk (see ``safetensors_reader.CHUNK_BYTES``) plus the vocabulary.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from edge.convert.safetensors_reader import SafetensorsCheckpoint
from edge.convert.tensor_names import ARCH_NAME, Hyperparams
from edge.convert.vocab import BpeVocab

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]  # called with bytes written


def add_hyperparams(writer: gguf.GGUFWriter, hp: Hyperparams, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_block_count(hp.layers)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    writer.add_rope_freq_base(float(hp.rope_theta))
    writer.add_layer_norm_rms_eps(float(hp.rms_eps))


def _pad(fout, alignment: int) -> None:
    fout.write(b"\0" * (-fout.tell() % alignment))


def write_f32_gguf(path: Path, checkpoint: SafetensorsCheckpoint, plan: list[tuple[str, str]],
                   hp: Hyperparams, vocab: BpeVocab, name: str, progress: ProgressFn | None = None) -> int:
    """Write `path` (the caller's temporary name) and return its tensor count."""
    writer = gguf.GGUFWriter(path=None, arch=ARCH_NAME)
    add_hyperparams(writer, hp, name)
    vocab.add_to_gguf(writer)
    for gguf_name, hf_name in plan:
        entry = checkpoint.entries[hf_name]
        writer.add_tensor_info(gguf_name, entry.shape, np.dtype(np.float32), entry.n_elements * 4)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None  # write_header_to_file opened it
    fout = writer.fout[0]
    try:
        for _gguf_name, hf_name in plan:
            _pad(fout, writer.data_alignment)
            for chunk in checkpoint.iter_f32_chunks(hf_name):
                chunk.tofile(fout)
                if progress:
                    progress(chunk.nbytes)
        _pad(fout, writer.data_alignment)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
    logger.info("wrote %s: %d tensors", path, len(plan))
    return len(plan)

