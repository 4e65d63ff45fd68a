"""The one gate before llama.cpp sees a model: check the file, then check that it fits the budget."""
from __future__ import annotations

import logging
from pathlib import Path

from edge.model.gguf_check import GGUFInfo, ModelFileError, check_gguf
from edge.model.memory import FitPlan, effective_budget_bytes, plan_fit
from edge.settings import Settings

log = logging.getLogger(__name__)


class ModelDoesNotFit(ModelFileError):
    """The model would exceed the memory budget; the message names a configuration that fits."""

    def __init__(self, plan: FitPlan) -> None:
        super().__init__(plan.message)
        self.plan = plan


def preflight(path: Path | str, settings: Settings, budget_bytes: int | None = None) -> tuple[GGUFInfo, FitPlan]:
    """Validate ``path`` and its memory fit under ``settings``; raise ModelFileError / ModelDoesNotFit.

    Call this before any llama.cpp load: a corrupt file is refused here, not by a segfault.
    """
    info = check_gguf(path)
    m = settings.model
    budget = budget_bytes if budget_bytes is not None else effective_budget_bytes(settings.memory.budget_mb)
    plan = plan_fit(info, budget, m.n_ctx, m.kv_cache_type, m.n_batch, m.n_seq_max, m.flash_attn,
                    headroom=settings.memory.hard_fraction)
    if not plan.fits:
        raise ModelDoesNotFit(plan)
    log.info("%s: %s", Path(path).name, plan.message)
    return info, plan
