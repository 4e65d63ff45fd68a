"""The llama.cpp runtime's process-level choices: how the model file is loaded, heap release."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge.engine.process_memory import release_free_heap
from edge.engine.runtime import LlamaRuntime, RuntimeConfig, top_ids


def _resident_in_mappings(path: Path) -> int | None:
    """Resident bytes of this process's mappings of `path` (None: not mapped)."""
    real, total, inside = str(path.resolve()), None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(real)
        elif inside and head[0] == "Rss:":
            total = (total or 0) + int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_a_mapped_model_has_its_pages_dropped_after_loading(tiny_gguf, tmp_path):
    import shutil
    tiny_gguf = shutil.copy(tiny_gguf, tmp_path / "own.gguf")  # a file no other engine here has mapped
    size = Path(tiny_gguf).stat().st_size
    assert size > 1 << 20  # enough pages for the check below to mean something
    logits = {}
    for mmap in (False, True):
        rt = LlamaRuntime(tiny_gguf, RuntimeConfig(n_ctx=256, n_batch=64, n_seq_max=1, mmap=mmap))
        try:
            resident = _resident_in_mappings(Path(tiny_gguf))
            if mmap:
                # llama.cpp maps with MAP_POPULATE: without the drop all `size` bytes are resident
                assert resident is not None and resident < size // 4
            else:
                assert resident is None
            # dropped pages come back from the file: the same logits either way, twice over
            logits[mmap] = []
            for _ in range(2):
                rt.seq_rm(0)
                logits[mmap].append(rt.decode([(0, rt.tokenize("hello world"), 0)])[0])
        finally:
            rt.close()
    for a, b in zip(logits[False], logits[True]):
        np.testing.assert_array_equal(a, b)


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


_HEAP_SCRIPT = """
import ctypes, sys, psutil
from edge.engine.process_memory import keep_heap_small
if sys.argv[1] == "fixed":
    assert keep_heap_small()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(24 << 20))      # glibc would now raise its mmap threshold to 24 MiB
blocks = [libc.malloc(1 << 20) for _ in range(32)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
rss = psutil.Process().memory_info().rss
for b in blocks:
    libc.free(b)
print((rss - psutil.Process().memory_info().rss) >> 20)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc")
def test_keep_heap_small_stops_freed_megabyte_blocks_staying_resident():
    import subprocess
    import sys

    def returned_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())
    assert returned_mib("fixed") >= 28   # 32 MiB freed, all of it given back
    assert returned_mib("default") <= 8  # the behaviour keep_heap_small exists to stop


def test_decode_one_gives_the_logits_decode_copies_across_batch_chunks(tiny_gguf):
    rt = LlamaRuntime(tiny_gguf, RuntimeConfig(n_ctx=512, n_batch=64, n_seq_max=2))
    try:
        tokens = rt.tokenize("the quick brown fox " * 10)
        assert len(tokens) > 2 * rt.n_batch
        copied = rt.decode([(0, tokens, 0)])[0]
        view = rt.decode_one(1, tokens, 0)
        np.testing.assert_array_equal(view, copied)
        with pytest.raises(ValueError):
            rt.decode_one(1, [], len(tokens))
    finally:
        rt.close()


@pytest.mark.parametrize("k", [1, 40, 104, 1664, 30000])
@pytest.mark.parametrize("shape", ["normal", "ties", "masked"])
def test_top_ids_are_exactly_the_k_best_with_ties_in_id_order(k, shape):
    # a Qwen-sized vocabulary: the tiny test model's is too small for the sampled threshold
    rng = np.random.default_rng(k)
    logits = (rng.standard_normal(151_936) * 3).astype(np.float32)
    if shape == "ties":  # few distinct values: many tie with the k-th
        logits = np.round(logits).astype(np.float32)
    if shape == "masked":  # a grammar or an end mask: most of the vocabulary at -inf
        logits[rng.random(len(logits)) < 0.97] = -np.inf
    kth = np.sort(logits)[len(logits) - k]
    expected = np.flatnonzero(logits >= kth)
    got = top_ids(logits, k, np.empty_like(logits), np.empty(len(logits), dtype=bool))
    assert got.dtype == np.int32
    assert np.array_equal(got, expected)
