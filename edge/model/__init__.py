"""Open, check and size a GGUF model before llama.cpp sees it (pure Python, no llama.cpp import)."""
from edge.model.gguf_check import GGUFInfo, ModelFileError, TensorEntry, check_gguf
from edge.model.memory import FitPlan, MemoryEstimate, effective_budget_bytes, estimate_memory, plan_fit
from edge.model.preflight import ModelDoesNotFit, preflight

__all__ = ["GGUFInfo", "ModelFileError", "TensorEntry", "check_gguf", "FitPlan", "MemoryEstimate",
           "effective_budget_bytes", "estimate_memory", "plan_fit", "ModelDoesNotFit", "preflight"]
