"""manifest.json of an output folder: what each file is, its checksum, and where it came from.

The one module that knows the file: the converter writes it (`Manifest`), the model inventory
(edge/model/inventory.py, `doctor`) reads it back (`read_file_entries`).

A re-run skips an output whose entry matches: same source, same type, and the file on disk still
has the recorded size and sha256. The manifest itself is written atomically after every output,
so an interrupted run keeps the entries of the files it finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TOOL_PACKAGES = ("qwen-edge", "gguf", "llama-cpp-python", "numpy", "safetensors", "huggingface-hub")


@dataclass(frozen=True)
class OutputEntry:
    file: str            # name inside the output folder
    type: str            # f32, q8_0, q4_k_m
    size: int
    sha256: str
    tensor_count: int
    source_key: str      # identifies the input: repo@revision or folder fingerprint


def sha256_of(path: Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class ManifestError(ValueError):
    """manifest.json cannot be read back; the message names the file."""


def read_file_entries(folder: Path) -> dict[str, dict]:
    """file name -> manifest entry of `folder`'s manifest.json ({} when there is none); accepts
    {"files": [...]} or a bare list of entries."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    entries = data.get("files", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: unexpected manifest layout (no list of files)")
    out = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            out[Path(entry["file"]).name] = entry
    return out


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Manifest:
    """The manifest of one output folder, read once and rewritten after each output."""

    def __init__(self, out_dir: Path, source: dict[str, Any]) -> None:
        self.path = out_dir / MANIFEST_NAME
        self.source = source
        self.outputs: dict[str, OutputEntry] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.outputs = {o["type"]: OutputEntry(**o) for o in data.get("files", [])}
            except (ValueError, TypeError, KeyError):
                logger.warning("%s: unreadable, starting a new one", self.path)

    def matching(self, out_type: str, source_key: str) -> OutputEntry | None:
        """The recorded entry when the file on disk is still exactly what it records."""
        entry = self.outputs.get(out_type)
        if entry is None or entry.source_key != source_key:
            return None
        path = self.path.parent / entry.file
        if not path.is_file() or path.stat().st_size != entry.size or sha256_of(path) != entry.sha256:
            return None
        return entry

    def record(self, entry: OutputEntry) -> None:
        self.outputs[entry.type] = entry
        self.save()

    def save(self) -> None:
        data = {"source": self.source, "tools": tool_versions(),
                "files": [asdict(e) for e in self.outputs.values()]}
        write_json_atomic(self.path, data)
