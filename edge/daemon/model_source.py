"""Which GGUF the daemon serves: a given file, a given HF folder (converted first), the configured
model folder, or, when that is empty, the default model fetched and converted once."""
from __future__ import annotations

import logging
from pathlib import Path

from edge.model.locate import ModelNotFound, find_model
from edge.settings import Settings

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No model could be found or made; the message is one line saying what to do."""


def _convert(settings: Settings, from_dir: Path | None, progress: bool) -> Path:
    from edge.convert.errors import ConversionError
    from edge.convert.pipeline import ConvertRequest, run_conversion

    m = settings.model
    request = ConvertRequest(out_dir=m.dir, types=(m.quant,), from_dir=from_dir, repo=m.repo,
                             revision=m.revision, n_threads=m.n_threads, progress=progress)
    try:
        result = run_conversion(request)
    except ConversionError as exc:
        hint = ("" if from_dir else " Offline? Point qwen-edge at a local model: "
                "`qwen-edge serve --model FILE.gguf` or `--model HF_FOLDER`.")
        raise ModelUnavailable(f"{str(exc).rstrip('.')}.{hint}") from None
    for entry in result.written + result.skipped:
        if entry.type == m.quant:
            return m.dir / entry.file
    raise ModelUnavailable(f"conversion wrote no {m.quant} file into {m.dir}")


def resolve_model(settings: Settings, explicit: Path | None = None, progress: bool = False) -> Path:
    """The GGUF to serve; converts an HF folder (``explicit`` or the default repo) when needed."""
    if explicit is not None:
        explicit = explicit.expanduser()
        if explicit.is_dir():
            log.info("converting the Hugging Face folder %s into %s", explicit, settings.model.dir)
            return _convert(settings, explicit, progress)
        if not explicit.is_file():
            raise ModelUnavailable(f"model not found: {explicit} (give a .gguf file or a Hugging Face model folder)")
        return explicit
    try:
        return find_model(settings)
    except ModelNotFound as exc:
        if settings.model.path is not None:
            raise ModelUnavailable(str(exc)) from None
    log.warning("no model in %s: fetching and converting %s", settings.model.dir, settings.model.repo)
    return _convert(settings, None, progress)
