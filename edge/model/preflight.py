"""The one gate before llama.cpp sees a model: check the file, then check that it fits the budget."""
from __future__ import annotations

import logging
from pathlib import Path

from edge.model.gguf_check import GGUFInfo, ModelFileError, check_gguf
from edge.model.memory import FitPlan, effective_budget_bytes, estimate_memory, plan_fit, repacked_bytes
from edge.settings import ModelSettings, Settings

log = logging.getLogger(__name__)


class ModelDoesNotFit(ModelFileError):
    """The model would exceed the memory budget; the message names a configuration that fits."""

    def __init__(self, plan: FitPlan) -> None:
        super().__init__(plan.message)
        self.plan = plan


def context_options(m: ModelSettings, info: GGUFInfo, repack_rows: dict[str, int] | None = None) -> dict:
    """The model settings that shape llama.cpp's context and so its memory, by the keyword names
    `estimate_memory`, `plan_fit` and the engine's `RuntimeConfig` (edge/engine/config.py, which
    the engine, the memory measurement and the raw baseline build their contexts from) share: one
    place to add a new one. ``mmap`` comes resolved (`resolve_mmap`)."""
    return {"n_batch": m.n_batch, "n_ubatch": m.n_ubatch, "n_seq_max": m.n_seq_max, "flash_attn": m.flash_attn,
            "mmap": resolve_mmap(info, m, repack_rows)}


def resolve_mmap(info: GGUFInfo, m: ModelSettings, repack_rows: dict[str, int] | None = None) -> bool:
    """Whether to map the file: the setting, or for ``auto`` when what mapping can save is larger
    than what it can cost.

    Mapped (and its pages dropped after loading), an untied token embedding is resident only in
    the rows texts use, and weights are pages the kernel can reclaim; but pages of weights the CPU
    backend repacks can come back next to weights in use (see memory.py). So: map when the untied
    embedding outweighs the repacked weights. On x86 that maps the stand-in (94 MB embedding,
    29 MB repacked) and Qwen1.5 Q8_0 (nothing repacked), and reads Qwen1.5 Q4_K_M (88 MB vs 147 MB).
    """
    if m.mmap != "auto":
        return bool(m.mmap)
    if repack_rows is None:
        from edge.model.cpu import repacked_types_for_this_cpu
        repack_rows = repacked_types_for_this_cpu()
    embedding = 0 if info.tied_embeddings else sum(t.nbytes for t in info.tensors if t.name == "token_embd.weight")
    return embedding > repacked_bytes(info, repack_rows)


def resolve_kv_cache_type(info: GGUFInfo, settings: Settings, budget_bytes: int | None = None) -> str:
    """The KV cache type to run with: the setting, or for ``auto`` f16 when the whole estimate stays
    under the memory guard's soft limit with it, else q8_0.

    f16 is the fast one on CPU: llama.cpp's flash attention reads f16 K/V directly and has a tiled
    kernel for prompts of 64+ tokens, while q8_0 V rows are dequantized one by one. Measured on the
    stand-in, a sentiment request after the cached prefix takes 10 % (short) to 27 % (long) longer
    with q8_0. q8_0 halves the cache, which is what lets Qwen1.5 Q8_0 fit 1 GiB.
    """
    m = settings.model
    if m.kv_cache_type != "auto":
        return m.kv_cache_type
    if not m.flash_attn:
        return "f16"  # llama.cpp quantizes the V cache only with flash attention
    budget = budget_bytes if budget_bytes is not None else effective_budget_bytes(settings.memory.budget_mb)
    f16 = estimate_memory(info, m.n_ctx, "f16", **context_options(m, info))
    return "f16" if f16.total_bytes <= budget * settings.memory.soft_fraction else "q8_0"


def plan_for(info: GGUFInfo, settings: Settings, budget_bytes: int) -> FitPlan:
    """`plan_fit` with the model settings (KV cache type resolved)."""
    m = settings.model
    return plan_fit(info, budget_bytes, m.n_ctx, resolve_kv_cache_type(info, settings, budget_bytes),
                    headroom=settings.memory.hard_fraction, **context_options(m, info))


def preflight(path: Path | str, settings: Settings, budget_bytes: int | None = None) -> tuple[GGUFInfo, FitPlan]:
    """Validate ``path`` and its memory fit under ``settings``; raise ModelFileError / ModelDoesNotFit.

    Call this before any llama.cpp load: a corrupt file is refused here, not by a segfault.
    """
    info = check_gguf(path)
    budget = budget_bytes if budget_bytes is not None else effective_budget_bytes(settings.memory.budget_mb)
    plan = plan_for(info, settings, budget)
    if not plan.fits:
        raise ModelDoesNotFit(plan)
    log.info("%s: %s", Path(path).name, plan.message)
    return info, plan
