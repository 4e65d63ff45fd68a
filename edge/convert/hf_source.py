"""Where the HF checkpoint comes from: a pinned Hub revision (downloaded) or a local folder.

Only the files the converter reads are downloaded (``ALLOW_PATTERNS``); huggingface-hub shows a
progress bar and resumes partial downloads from its cache.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from edge.convert.errors import ConversionError

logger = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json",
]
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "model.safetensors.index.json")


@dataclass(frozen=True)
class Source:
    folder: Path
    description: dict[str, str]   # written into the manifest
    key: str                      # changes whenever the input may have changed


def download(repo: str, revision: str, cache_dir: Path | None = None) -> Source:
    """Fetch `repo` at `revision` (progress bar, resumable) and describe it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hf_logging

    # Its per-retry warnings (printed twice, by its own handler and ours) bury the one line we
    # print when the download finally fails; keep errors only.
    hf_logging.set_verbosity_error()

    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                        cache_dir=cache_dir))
    except Exception as exc:  # network, auth, unknown revision: all end the run the same way
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConversionError(f"cannot download {repo}@{revision}: {first_line}") from None
    return Source(folder=folder, description={"repo": repo, "revision": revision},
                  key=f"hf:{repo}@{revision}")


def local(folder: Path) -> Source:
    """A local HF folder; its key fingerprints the small files and the weights' names, sizes and mtimes."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Source(folder=folder, description={"folder": str(folder)}, key=f"dir:{digest.hexdigest()[:32]}")
