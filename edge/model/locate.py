"""Find the GGUF file to load: an explicit path, or the best file in the model folder."""
from __future__ import annotations

from pathlib import Path

from edge.settings import Settings

# Preference when the configured quantization is absent: smallest first, it fits a 1 GB box.
QUANT_PREFERENCE = ("q4_k_m", "q8_0", "f32")


class ModelNotFound(FileNotFoundError):
    """No model file where one was expected; the message says how to provide one."""


def find_model(settings: Settings, explicit: Path | str | None = None) -> Path:
    chosen = explicit if explicit is not None else settings.model.path
    if chosen is not None:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        return path
    folder = settings.model.dir
    wanted = (settings.model.quant, *[q for q in QUANT_PREFERENCE if q != settings.model.quant])
    for quant in wanted:
        hits = sorted(folder.glob(f"*-{quant}.gguf")) if folder.is_dir() else []
        if hits:
            return hits[0]
    raise ModelNotFound(f"no model in {folder}: pass --model FILE.gguf, or run "
                        f"`qwen-edge convert --out {folder}` (or --from-dir HF_FOLDER) first")
