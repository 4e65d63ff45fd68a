"""This process's memory, through glibc and the kernel: what the engine calls around a model load.

glibc's heap keeps freed blocks and raises its mmap threshold as large blocks are freed; after an
mmap load, the model file's pages are all resident. These helpers give the first back, stop the
second and drop the third. Each returns a falsy value where the C library or /proc is not there.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc malloc_trim); False where unavailable.

    Loading a model and building a context leave ~20 MiB of freed-but-kept heap in the process;
    the memory guard also calls this when it sheds load."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (its starting value); False where unavailable.

    glibc raises the threshold each time a large mmap'd block is freed, up to 32 MiB, after which
    blocks of that size come from the heap and stay there once freed. Loading a model frees many
    such blocks; measured on the daemon, that left ~28 MiB more resident than with a fixed threshold.
    The hot paths allocate nothing that large per token, so fixing it costs no speed."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):  # not glibc
        return False


_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of `path`."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end))
    return found


def drop_mapped_pages(path: Path) -> int:
    """After an mmap load, drop the model file's pages from this process (MADV_DONTNEED); the
    number of bytes advised, 0 where unsupported.

    llama.cpp maps the file with MAP_POPULATE, so every page starts out resident, including the
    originals of the weights it has just repacked into its own buffers and will never read again.
    Dropped pages come back on first use from the page cache, as clean file pages the kernel can
    reclaim under pressure. The rows of an untied token embedding no text has used stay out, and
    so do most of those originals: the kernel maps a whole page-cache folio on a fault, so some
    next to weights in use come back (memory.py counts them). Measured on the stand-in daemon:
    666 MB read, 695 MB mapped, 605 MB mapped and dropped."""
    try:
        libc = ctypes.CDLL(None)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        mappings = _file_mappings(path)
    except (OSError, AttributeError):  # not Linux/glibc
        return 0
    advised = 0
    for start, end in mappings:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised
