"""Measure what a model really costs: load it in a child process, fill the context, read RSS.

A child process because a bad llama.cpp build or file can kill the process that loads it, and
because RSS of a fresh process is the figure the estimate is compared with. The child loads the
model and creates its context with the engine's own code (`runtime.load_model`,
`runtime.context_params`, from one `RuntimeConfig`), evaluates ``n_ctx`` tokens in ``n_batch``
chunks and prints one JSON line; llama.cpp's own buffer-size log lines (stderr) are parsed too, so
the estimate (edge/model/memory.py) can be checked part by part.

Run by hand: ``python -m edge.engine.measure MODEL.gguf --n-ctx 2048 --kv q8_0``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# pure Python, and it imports what PYTHON_RUNTIME_BYTES counts (gguf, the settings): in the child,
# before its baseline; the caller never imports llama_cpp, only the child does
from edge.engine.config import RuntimeConfig

log = logging.getLogger(__name__)

MIB = 1 << 20
# "llama.cpp log line" -> our name for the buffer; a new llama.cpp buffer is one more row.
BUFFER_PATTERNS: dict[str, str] = {
    r"CPU_Mapped model buffer size\s*=\s*([\d.]+) MiB": "weights_mapped",
    r"CPU_REPACK model buffer size\s*=\s*([\d.]+) MiB": "weights_repacked",
    r"(?<!_)CPU model buffer size\s*=\s*([\d.]+) MiB": "weights_cpu",
    r"KV buffer size\s*=\s*([\d.]+) MiB": "kv_cache",
    r"CPU compute buffer size\s*=\s*([\d.]+) MiB": "compute",
    r"output buffer size\s*=\s*([\d.]+) MiB": "output",
}


@dataclass
class MeasuredMemory:
    rss_bytes: int                 # after the context was filled
    peak_rss_bytes: int            # ru_maxrss of the child
    uss_bytes: int | None
    baseline_rss_bytes: int        # the child before loading (Python + llama_cpp imported)
    rss_anon_bytes: int | None = None   # buffers: KV, compute, repacked weights, Python
    rss_file_bytes: int | None = None   # mmap'd model file pages
    buffers_mib: dict[str, float] = field(default_factory=dict)   # llama.cpp's own accounting
    n_tokens: int = 0
    seconds: float = 0.0


class MeasureError(RuntimeError):
    """The measuring child failed; the message says how (exit code or signal)."""


def measure_memory(model: Path | str, config: RuntimeConfig, timeout_s: float = 900.0,
                   python: str = sys.executable) -> MeasuredMemory:
    """Load ``model`` in a child process as `config` says, fill ``n_ctx`` tokens, return its memory figures."""
    cmd = [python, "-m", "edge.engine.measure", str(model), *child_arguments(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"measuring {model} took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        raise MeasureError(f"measuring {model} failed ({how}) {tail}".rstrip())
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return MeasuredMemory(buffers_mib=parse_buffer_sizes(proc.stderr), **result)


def parse_buffer_sizes(llama_log: str) -> dict[str, float]:
    """Sum llama.cpp's "<name> buffer size = N MiB" lines by buffer kind."""
    sizes: dict[str, float] = {}
    for pattern, name in BUFFER_PATTERNS.items():
        for match in re.finditer(pattern, llama_log):
            sizes[name] = sizes.get(name, 0.0) + float(match.group(1))
    return sizes


def child_arguments(config: RuntimeConfig) -> list[str]:
    """The child's command-line flags for `config` (the flags `_child` parses back into one)."""
    args = ["--n-ctx", str(config.n_ctx), "--kv", config.kv_cache_type, "--n-batch", str(config.n_batch),
            "--n-ubatch", str(config.n_ubatch), "--n-seq-max", str(config.n_seq_max),
            "--n-threads", str(config.n_threads)]
    return args + ([] if config.flash_attn else ["--no-flash-attn"]) + (["--mmap"] if config.mmap else [])


def _fill_context(model_path: str, config: RuntimeConfig) -> int:
    import llama_cpp  # only in the child: a crash here must not take the caller down

    from edge.engine.process_memory import release_free_heap
    from edge.engine.runtime import RuntimeError_, context_params, load_model

    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    logging.getLogger("edge.llama_cpp").setLevel(logging.DEBUG)   # buffer sizes go to stderr

    try:  # as the engine does (importing runtime also routes llama.cpp's log)
        model = load_model(Path(model_path), config.mmap)
    except RuntimeError_ as exc:
        raise SystemExit(str(exc)) from None
    ctx = llama_cpp.llama_init_from_model(model, context_params(config))
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context of {config.n_ctx} tokens")
    release_free_heap()
    n_ctx, n_batch = config.n_ctx, config.n_batch
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    pos = 0
    while pos < n_ctx:
        n = min(n_batch, n_ctx - pos)
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = (pos + i) * 7919 % min(n_vocab, 150_000)  # spread over ordinary tokens
            batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = pos + i, 1, 0
            batch.logits[i] = i == n - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit(f"llama_decode failed at position {pos}")
        pos += n
    return pos


def _rss_split() -> dict[str, int]:
    """Anonymous vs file-backed resident bytes (Linux), to tell weights pages from buffers."""
    split = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                split[key.lower().replace("rss", "rss_") + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return split


def _child(argv: list[str]) -> None:
    import resource
    import time

    import psutil

    ap = argparse.ArgumentParser(prog="python -m edge.engine.measure")
    ap.add_argument("model")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--kv", choices=("f16", "q8_0"), default="q8_0")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--n-seq-max", type=int, default=1)
    ap.add_argument("--n-threads", type=int, default=0, help="0: one per physical core")
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--mmap", action="store_true")
    args = ap.parse_args(argv)
    proc = psutil.Process()
    import llama_cpp  # noqa: F401  (the baseline includes the library, as in the daemon)
    baseline = proc.memory_info().rss
    config = RuntimeConfig(n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch, n_threads=args.n_threads,
                           n_seq_max=args.n_seq_max, kv_cache_type=args.kv, flash_attn=not args.no_flash_attn,
                           mmap=args.mmap)
    start = time.monotonic()
    n = _fill_context(args.model, config)
    try:
        uss = proc.memory_full_info().uss
    except (psutil.AccessDenied, AttributeError):
        uss = None
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = json.dumps({"rss_bytes": proc.memory_info().rss, "peak_rss_bytes": peak_kib * 1024, "uss_bytes": uss,
                       "baseline_rss_bytes": baseline, "n_tokens": n, **_rss_split(),
                       "seconds": round(time.monotonic() - start, 2)})
    print(line, flush=True)  # noqa: T201 (the child's one line of output, read by measure_memory)


if __name__ == "__main__":
    _child(sys.argv[1:])
