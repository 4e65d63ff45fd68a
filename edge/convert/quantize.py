"""Q8_0 and Q4_K_M from the F32 GGUF with llama.cpp's own quantizer (through llama-cpp-python).

We start from ``llama_model_quantize_default_params()`` and change only the target type and the
thread count, so the mix of per-tensor types (e.g. Q6_K for ``output.weight`` in Q4_K_M) is
exactly llama.cpp's. Where a tensor's row length is not a multiple of 256, llama.cpp itself falls
back to a compatible legacy type for that tensor; we do not second-guess it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

from edge.convert.errors import ConversionError

logger = logging.getLogger(__name__)

# our type name -> llama.cpp file type
QUANT_FTYPES: dict[str, int] = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}
LLAMA_LOGGER = logging.getLogger("llama-cpp-python")  # where llama.cpp's own log lines go


@contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Some llama.cpp quantizer lines (e.g. the per-tensor k-quant fallback warnings) bypass the log
    callback and go straight to file descriptor 2: send them to our log instead of the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", errors="replace").splitlines()
    fallbacks = [line for line in lines if "falling back" in line]
    for line in lines:
        logger.debug("llama.cpp: %s", line)
    if fallbacks:
        logger.info("llama.cpp used a fallback type for %d tensor(s) (rows not a multiple of 256)", len(fallbacks))


def quantize_gguf(src: Path, dst: Path, quant_type: str, n_threads: int = 0) -> None:
    """Quantize `src` (F32 GGUF) into `dst` (the caller's temporary name)."""
    if quant_type not in QUANT_FTYPES:
        raise ConversionError(f"unknown quantization type {quant_type!r} (known: {', '.join(QUANT_FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant_type]
    params.nthread = n_threads if n_threads > 0 else (os.cpu_count() or 1)
    saved_level = LLAMA_LOGGER.level
    if not logger.isEnabledFor(logging.DEBUG):
        LLAMA_LOGGER.setLevel(logging.ERROR)  # llama.cpp prints one line per tensor otherwise
    try:
        with _native_stderr_to_log():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        LLAMA_LOGGER.setLevel(saved_level)
    if rc != 0:
        raise ConversionError(f"{src}: llama.cpp could not quantize to {quant_type} (code {rc}; "
                              f"disk full or {dst.parent} not writable?)")
    logger.info("quantized %s -> %s (%s)", src, dst, quant_type)
