"""Is this machine, this llama.cpp build and these model files fit to serve? (`qwen-edge doctor`)

Checks CPU features against the build (by a probe in a child process, so a bad build cannot crash
the doctor), memory and budget, model files (header and sha256 against manifest.json) and, per
model, the memory estimate; with ``measure`` each model is loaded in a child
(edge/engine/measure.py) and compared. Nothing here imports llama.cpp.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil

from edge.model import cpu as cpu_mod
from edge.model.gguf_check import ModelFileError, check_gguf
from edge.model.inventory import ModelFileReport, inspect_model_dir
from edge.model.memory import cgroup_chain_limit, effective_budget_bytes
from edge.model.preflight import context_options, plan_for
from edge.settings import Settings

STANDIN_ENV = "QWEN_EDGE_STANDIN_GGUF"


def _probe_model(settings: Settings, reports: list[ModelFileReport], explicit: Path | None) -> Path | None:
    """A model that passed the header check, to decode with in the probe."""
    candidates = [explicit, settings.model.path] + [r.path for r in reports if r.error is None]
    if os.environ.get(STANDIN_ENV):
        candidates.append(Path(os.environ[STANDIN_ENV]))
    for path in candidates:
        if path and Path(path).is_file():
            try:
                check_gguf(path)
                return Path(path)
            except ModelFileError:
                continue
    return None


def _cpu_section(settings: Settings, reports: list[ModelFileReport], model: Path | None,
                 probe_cmd: list[str] | None, timeout_s: float) -> dict:
    info = cpu_mod.read_cpu_info()
    probe_model = _probe_model(settings, reports, model)
    result = cpu_mod.run_probe(probe_cmd or cpu_mod.probe_command(probe_model), timeout_s)
    missing = cpu_mod.build_features_missing_on_cpu(result.system_info, info)
    safe = result.safe and not missing
    message = result.message
    if missing and result.safe:
        message = f"{cpu_mod.UNSAFE_HINT} (build uses {', '.join(missing)}, not listed by this CPU)"
    return {**info.to_dict(), "build": result.system_info, "build_features_missing_on_cpu": missing,
            "probe_model": str(probe_model) if probe_model else None, "safe": safe,
            "decoded": result.decoded, "message": message, "ok": safe is not False}


def _memory_section(settings: Settings) -> dict:
    vm = psutil.virtual_memory()
    limit = cgroup_chain_limit()
    return {"total_bytes": vm.total, "available_bytes": vm.available, "cgroup_limit_bytes": limit,
            "budget_setting_mb": settings.memory.budget_mb,
            "effective_budget_bytes": effective_budget_bytes(settings.memory.budget_mb), "ok": True}


def _model_entry(report: ModelFileReport, settings: Settings, budget: int, measure: bool) -> dict:
    entry = report.to_dict()
    if report.info is None:
        return entry
    m = settings.model
    plan = plan_for(report.info, settings, budget)
    kv = plan.estimate.kv_cache_type
    entry.update(estimate=plan.estimate.to_dict(), fits=plan.fits, fit_message=plan.message)
    if measure:
        from edge.engine.config import runtime_config
        from edge.engine.measure import MeasureError, measure_memory
        from edge.model.memory import PYTHON_RUNTIME_BYTES, estimate_memory
        bare = estimate_memory(report.info, m.n_ctx, kv, runtime_bytes=PYTHON_RUNTIME_BYTES,
                               **context_options(m, report.info))
        try:
            got = measure_memory(report.path, runtime_config(report.info, settings, kv))
            error = (bare.total_bytes - got.rss_bytes) / got.rss_bytes
            entry["measured"] = {"rss_bytes": got.rss_bytes, "peak_rss_bytes": got.peak_rss_bytes,
                                 "estimate_bare_bytes": bare.total_bytes, "error": round(error, 4),
                                 "within_10pct": abs(error) <= 0.10, "llama_buffers_mib": got.buffers_mib}
        except MeasureError as exc:
            entry["measured"] = {"error_message": str(exc)}
    return entry


def run_doctor(settings: Settings, model: Path | None = None, measure: bool = False,
               probe_cmd: list[str] | None = None, probe_timeout_s: float = 120.0,
               checksums: bool = True) -> dict:
    """Everything doctor reports, as a dict; ``ok`` is False when something is wrong."""
    extra = [model] if model else []
    if settings.model.path and settings.model.path not in extra:
        extra.append(settings.model.path)
    reports = inspect_model_dir(settings.model.dir, [Path(p) for p in extra], with_checksum=checksums)
    memory = _memory_section(settings)
    models = [_model_entry(r, settings, memory["effective_budget_bytes"], measure) for r in reports]
    cpu = _cpu_section(settings, reports, model, probe_cmd, probe_timeout_s)
    ok = cpu["ok"] and all(m["ok"] for m in models)
    return {"ok": ok, "cpu": cpu, "memory": memory, "model_dir": str(settings.model.dir), "models": models}
