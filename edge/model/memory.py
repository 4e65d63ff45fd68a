"""Estimate, from a GGUF header alone, the resident memory llama.cpp will need, and plan a fit.

The parts (all measured on llama.cpp's CPU backend; see docs/measurement-history.md "Memory (issue 4)"):

- weights: every byte of the file's data section, read into buffers or, with mmap, as mapped file
  pages. Counting all of it is the worst case for mmap: the engine drops the mapping's pages
  after loading (`drop_mapped_pages`), and rows of an untied token embedding no text has used stay
  out;
- repacked weights: the CPU backend copies some quant types into an interleaved layout in an
  extra (anonymous) buffer, e.g. Q4_0/Q4_K on x86 with AVX2 (see cpu.py). Read into buffers, a
  repacked weight exists once. With mmap its original pages are dropped after loading, but the
  kernel maps whole page-cache folios (up to 2 MiB) on a fault, so pages of originals next to
  weights in use come back: the worst case counts them twice;
- KV cache: n_layer × n_ctx × n_head_kv × (head_dim_k + head_dim_v) × bytes per element;
- compute: llama.cpp *reserves* n_vocab × n_ubatch floats for the worst case, but only the
  activations of one ubatch are ever touched: ~(3·n_ff + 6·n_embd) floats per token, plus a fixed
  part; without flash attention the n_ctx × n_ubatch × n_head score matrix comes on top;
- outputs: one row of n_vocab logits per sequence;
- runtime: Python with llama_cpp and numpy imported, plus the daemon's own modules.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edge.model.gguf_check import GGUFInfo, TensorEntry

log = logging.getLogger(__name__)

MIB = 1 << 20
# bytes per element of the KV cache types the settings allow
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32}
KV_PADDING = 256                       # llama.cpp rounds the cache size up to this many cells
# Calibrated: python -m edge.engine.measure on the stand-in and Qwen1.5-shaped files (docs/measurement-history.md).
COMPUTE_FIXED_BYTES = 48 * MIB
COMPUTE_FLOATS_PER_TOKEN = {"n_ff": 3, "n_embd": 6}
# RSS of python with numpy, llama_cpp, gguf and the settings (pydantic) imported, before loading:
PYTHON_RUNTIME_BYTES = 59 * MIB
# On top, in the daemon: fastapi, uvicorn, prometheus-client (11 MiB), engine state, threads. Measured:
# `qwen-edge serve` with Qwen1.5-shaped Q4_K_M after three ~900-token chats, 858 MB vs 804 MB for
# `python -m edge.engine.measure` with the same settings.
DAEMON_EXTRA_BYTES = 50 * MIB
CGROUP_V2_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
CGROUP_UNLIMITED = 1 << 60             # v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class MemoryEstimate:
    file_type: str
    n_ctx: int
    kv_cache_type: str
    weights_bytes: int          # data section of the file
    repacked_bytes: int         # with mmap: originals that may be resident besides their repacked copies
    kv_cache_bytes: int
    compute_bytes: int          # resident part of the compute buffer
    output_bytes: int
    runtime_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.repacked_bytes + self.kv_cache_bytes + self.compute_bytes
                + self.output_bytes + self.runtime_bytes)

    def to_dict(self) -> dict:
        return {**self.__dict__, "total_bytes": self.total_bytes}


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, kv_cache_type: str) -> int:
    cells = math.ceil(n_ctx / KV_PADDING) * KV_PADDING
    per_cell = info.n_head_kv * (info.head_dim_k + info.head_dim_v) * KV_BYTES_PER_ELEMENT[kv_cache_type]
    return int(info.n_layer * cells * per_cell)


def repacked_bytes(info: GGUFInfo, repack_rows: dict[str, int]) -> int:
    """Bytes of matrix weights the CPU backend repacks; ``repack_rows``: type name -> row multiple."""
    total = 0
    for t in info.tensors:
        multiple = repack_rows.get(t.type_name)
        # token_embd is read by row lookup (GET_ROWS), which the repacked layout does not serve
        if multiple and len(t.shape) >= 2 and t.name != "token_embd.weight" and t.shape[1] % multiple == 0:
            total += t.nbytes
    return total


def compute_bytes(info: GGUFInfo, n_ctx: int, n_batch: int, flash_attn: bool) -> int:
    floats = sum(n * getattr(info, dim) for dim, n in COMPUTE_FLOATS_PER_TOKEN.items())
    total = COMPUTE_FIXED_BYTES + n_batch * floats * 4
    if not flash_attn:
        total += n_batch * n_ctx * info.n_head * 4
    return total


def estimate_memory(info: GGUFInfo, n_ctx: int, kv_cache_type: str = "q8_0", n_batch: int = 512,
                    n_seq_max: int = 1, flash_attn: bool = True, repack_rows: dict[str, int] | None = None,
                    runtime_bytes: int = PYTHON_RUNTIME_BYTES + DAEMON_EXTRA_BYTES,
                    mmap: bool = False, n_ubatch: int | None = None) -> MemoryEstimate:
    """Resident bytes of serving ``info`` with this context; ``repack_rows`` defaults to this CPU's.

    ``n_ubatch`` (default: ``n_batch``) is what sizes the compute buffer; llama.cpp caps it at n_batch."""
    if kv_cache_type not in KV_BYTES_PER_ELEMENT:
        raise ValueError(f"kv_cache_type must be one of {', '.join(KV_BYTES_PER_ELEMENT)}, not {kv_cache_type!r}")
    if not mmap:
        repack_rows = {}  # read into buffers: a repacked weight is resident once, inside weights_bytes
    elif repack_rows is None:
        from edge.model.cpu import repacked_types_for_this_cpu
        repack_rows = repacked_types_for_this_cpu()
    n_ubatch = min(n_ubatch or n_batch, n_batch, n_ctx)
    return MemoryEstimate(
        file_type=info.file_type, n_ctx=n_ctx, kv_cache_type=kv_cache_type,
        weights_bytes=info.size_bytes - info.data_offset,
        repacked_bytes=repacked_bytes(info, repack_rows),
        kv_cache_bytes=kv_cache_bytes(info, n_ctx, kv_cache_type),
        compute_bytes=compute_bytes(info, n_ctx, n_ubatch, flash_attn),
        output_bytes=info.n_vocab * max(1, n_seq_max) * 4,
        runtime_bytes=runtime_bytes,
    )


# --- budget --------------------------------------------------------------------------------------

def cgroup_limit_bytes(v2_path: Path = CGROUP_V2_MAX, v1_path: Path = CGROUP_V1_LIMIT) -> int | None:
    """This process's cgroup memory limit, or None when there is none (or it cannot be read)."""
    for path in (v2_path, v1_path):
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        try:
            value = int(raw)
        except ValueError:
            log.warning("unreadable cgroup memory limit in %s: %r", path, raw[:40])
            continue
        return value if 0 < value < CGROUP_UNLIMITED else None
    return None


# cgroup version -> (hierarchy root, limit file); a process can sit in both (hybrid hosts).
CGROUP_HIERARCHIES: dict[str, tuple[Path, str]] = {
    "v2": (Path("/sys/fs/cgroup"), "memory.max"),
    "v1": (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
}


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """{"v2": "/path", "v1": "/path"} from /proc/self/cgroup ("0::/path" and "N:memory:/path" lines)."""
    found: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if line.startswith("0::"):
            found["v2"] = rel
        elif "memory" in controllers.split(","):
            found["v1"] = rel
    return found


def cgroup_chain_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                       roots: dict[str, tuple[Path, str]] | None = None) -> int | None:
    """Lowest memory limit from this process's cgroup up to the root, v2 and v1; None when unlimited."""
    roots = roots or CGROUP_HIERARCHIES
    limits = []
    for version, rel in _own_cgroups(proc_cgroup).items():
        root, name = roots[version]
        folder = root / rel.strip().lstrip("/")
        while True:
            limit = cgroup_limit_bytes(folder / name, Path("/nonexistent"))
            if limit:
                limits.append(limit)
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def effective_budget_bytes(setting_mb: int, cgroup_limit: int | None | Literal["auto"] = "auto") -> int:
    """The configured budget, or the cgroup's limit when that is lower."""
    budget = setting_mb * MIB
    limit = cgroup_chain_limit() if isinstance(cgroup_limit, str) else cgroup_limit  # "auto"
    return min(budget, limit) if limit else budget


# --- planning ------------------------------------------------------------------------------------

# quant -> (tensor role -> ggml type, default type for other matrices). A role is the name without
# "blk.N."; layer roles apply to the layers llama-quantize gives more bits. Close to llama-quantize's
# choices (Qwen1.5-0.5B: 665 / 407 MB), enough to say which file would fit.
RETYPE_RULES: dict[str, tuple[dict[str, str], str]] = {
    "f32": ({}, "F32"),
    "f16": ({}, "F16"),
    "q8_0": ({}, "Q8_0"),
    "q4_k_m": ({"output.weight": "Q6_K", "attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"}, "Q4_K"),
}
FALLBACK_TYPE = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}   # llama-quantize's choice when a row is not a multiple of 256


def _retyped(t: TensorEntry, rules: dict[str, str], default: str, n_layer: int) -> TensorEntry:
    if len(t.shape) < 2:
        return t                                           # norms and biases stay F32
    parts = t.name.split(".")
    in_layer = parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit()
    role = ".".join(parts[2:]) if in_layer else t.name
    target = rules.get(role, default)
    if in_layer and not _uses_more_bits(int(parts[1]), n_layer):
        target = default
    block = GGML_QUANT_SIZES[GGMLQuantizationType[target]][0]
    if t.shape[0] % block:
        target = FALLBACK_TYPE.get(target, "F16")
    qtype = GGMLQuantizationType[target]
    block, size = GGML_QUANT_SIZES[qtype]
    n_rows = math.prod(t.shape[1:])
    return replace(t, ggml_type=int(qtype), nbytes=t.shape[0] // block * size * n_rows)


def _uses_more_bits(i: int, n_layer: int) -> bool:
    # llama-quantize: the first and last eighth of the layers, and every third one between
    return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2


def retype_info(info: GGUFInfo, file_type: str) -> GGUFInfo:
    """The GGUFInfo the same model would have converted to ``file_type`` (header estimate only)."""
    if file_type == info.file_type:
        return info
    rules, default = RETYPE_RULES[file_type]
    tensors = tuple(_retyped(t, rules, default, info.n_layer) for t in info.tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    size = info.data_offset + sum(-(-t.nbytes // info.alignment) * info.alignment for t in tensors)
    return replace(info, file_type=file_type, tensors=tensors, tensor_bytes_by_type=by_type, size_bytes=size)


@dataclass(frozen=True)
class FitPlan:
    fits: bool
    estimate: MemoryEstimate               # for the requested configuration
    budget_bytes: int
    limit_bytes: int                       # budget × headroom: what the estimate must stay under
    suggestion: MemoryEstimate | None      # the first configuration that fits, when the request does not
    message: str


def _fmt(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 2e9 else f"{n / 1e6:.0f} MB"


def _fmt_budget(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / MIB:.0f} MiB"


def plan_fit(info: GGUFInfo, budget_bytes: int, n_ctx: int, kv_cache_type: str = "q8_0", n_batch: int = 512,
             n_seq_max: int = 1, flash_attn: bool = True, headroom: float = 0.97,
             quants: tuple[str, ...] = ("q8_0", "q4_k_m"), repack_rows: dict[str, int] | None = None,
             runtime_bytes: int = PYTHON_RUNTIME_BYTES + DAEMON_EXTRA_BYTES, mmap: bool = False,
             n_ubatch: int | None = None) -> FitPlan:
    """Does ``info`` fit ``budget_bytes × headroom``? If not, name the largest configuration that does.

    ``headroom`` is the memory guard's hard fraction: a model that fits stays below the point where
    the daemon refuses work (it may sit above the soft limit, where only idle sessions are dropped).

    Candidates keep the context as long as possible, then prefer the better quantization, then the
    larger KV cache type: n_ctx halves down to 512 only when no quant/cache type fits.
    """
    kw: dict[str, Any] = dict(n_batch=n_batch, n_seq_max=n_seq_max, flash_attn=flash_attn, repack_rows=repack_rows,
              runtime_bytes=runtime_bytes, mmap=mmap, n_ubatch=n_ubatch)
    limit = int(budget_bytes * headroom)
    wanted = estimate_memory(info, n_ctx, kv_cache_type, **kw)
    label = info.file_type.upper()
    if wanted.total_bytes <= limit:
        return FitPlan(True, wanted, budget_bytes, limit, None,
                       f"{label} n_ctx {n_ctx} kv {kv_cache_type}: est. {_fmt(wanted.total_bytes)} "
                       f"fits the budget of {_fmt_budget(budget_bytes)}")
    head = (f"{label} with n_ctx {n_ctx} and kv_cache_type {kv_cache_type} needs {_fmt(wanted.total_bytes)}; "
            f"budget {_fmt_budget(budget_bytes)} (limit {_fmt(limit)} at {headroom:.0%})")
    size_now = info.size_bytes
    options = [info.file_type] + [q for q in quants if q != info.file_type]
    ctx = n_ctx
    while ctx >= 256:
        for quant in options:
            candidate_info = retype_info(info, quant)
            if candidate_info.size_bytes > size_now:
                continue
            for kv in dict.fromkeys((kv_cache_type, "q8_0")):
                est = estimate_memory(candidate_info, ctx, kv, **kw)
                if est.total_bytes <= limit:
                    msg = (f"{head}; use {quant} with n_ctx {ctx} and kv_cache_type {kv} "
                           f"(est. {_fmt(est.total_bytes)})")
                    return FitPlan(False, wanted, budget_bytes, limit, est, msg)
        ctx = ctx // 2 if ctx > 512 else 0
    return FitPlan(False, wanted, budget_bytes, limit, None, f"{head}; no quantization or context of 512+ tokens fits")

