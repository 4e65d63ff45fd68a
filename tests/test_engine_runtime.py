"""The llama.cpp runtime's process-level choices: how the model file is loaded, heap release."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge.engine.runtime import LlamaRuntime, RuntimeConfig, release_free_heap


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_model_is_read_by_default_and_mapped_only_on_request(tiny_gguf):
    logits = {}
    for mmap in (False, True):
        rt = LlamaRuntime(tiny_gguf, RuntimeConfig(n_ctx=256, n_batch=64, n_seq_max=1, mmap=mmap))
        try:
            assert _mapped(Path(tiny_gguf)) is mmap
            logits[mmap] = rt.decode([(0, rt.tokenize("hello world"), 0)])[0]
        finally:
            rt.close()
    np.testing.assert_array_equal(logits[False], logits[True])


def test_ubatch_reaches_llama_cpp_and_is_capped_at_the_batch(tiny_gguf):
    import llama_cpp
    for n_batch, n_ubatch, expected in ((128, 64, 64), (64, 128, 64)):
        rt = LlamaRuntime(tiny_gguf, RuntimeConfig(n_ctx=256, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=1))
        try:
            assert (llama_cpp.llama_n_batch(rt.ctx), llama_cpp.llama_n_ubatch(rt.ctx)) == (n_batch, expected)
            rt.decode([(0, rt.tokenize("hello world " * 30), 0)])  # more tokens than one ubatch
        finally:
            rt.close()


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc")
def test_release_free_heap_gives_freed_c_heap_back():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    proc = psutil.Process()
    blocks = [libc.malloc(4096) for _ in range(25_000)]           # ~100 MiB of small heap blocks
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    keep = libc.malloc(4096)                                       # pins the heap top: no automatic trim
    for b in blocks:
        libc.free(b)
    before = proc.memory_info().rss
    assert release_free_heap()
    freed = before - proc.memory_info().rss
    libc.free(keep)
    assert freed > 50 * (1 << 20), f"only {freed / (1 << 20):.0f} MiB returned"
