"""The model files in a folder: header check, checksum against the converter's manifest.json."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.convert.manifest import MANIFEST_NAME, ManifestError, read_file_entries, sha256_of
from edge.model.gguf_check import GGUFInfo, ModelFileError, check_gguf

log = logging.getLogger(__name__)


@dataclass
class ModelFileReport:
    path: Path
    info: GGUFInfo | None
    error: str | None                 # ModelFileError message when the header check failed
    sha256: str | None
    expected_sha256: str | None       # from manifest.json; None when the file is not listed
    expected_size: int | None

    @property
    def checksum_ok(self) -> bool | None:
        """None: not listed in the manifest (or not hashed); then only the size is compared."""
        if self.expected_sha256 is None or self.sha256 is None:
            return None if self.size_ok is not False else False
        return self.sha256 == self.expected_sha256

    @property
    def size_ok(self) -> bool | None:
        if self.expected_size is None or not self.path.is_file():
            return None
        return self.path.stat().st_size == self.expected_size

    def to_dict(self) -> dict:
        return {"path": str(self.path), "ok": self.error is None and self.checksum_ok is not False,
                "error": self.error, "file_type": self.info.file_type if self.info else None,
                "size_bytes": self.info.size_bytes if self.info else None,
                "n_params": self.info.n_params if self.info else None,
                "sha256": self.sha256, "expected_sha256": self.expected_sha256, "checksum_ok": self.checksum_ok}


def read_manifest(folder: Path) -> dict[str, dict]:
    """file name -> manifest entry (edge/convert/manifest.py); ModelFileError when unreadable."""
    try:
        return read_file_entries(folder)
    except ManifestError as exc:
        raise ModelFileError(str(exc)) from None


def inspect_model_file(path: Path, manifest: dict[str, dict], with_checksum: bool = True) -> ModelFileReport:
    entry = manifest.get(path.name, {})
    try:
        info, error = check_gguf(path), None
    except ModelFileError as exc:
        info, error = None, str(exc)
    digest = sha256_of(path) if with_checksum and path.is_file() else None
    return ModelFileReport(path, info, error, digest, entry.get("sha256"), entry.get("size"))


def inspect_model_dir(folder: Path, extra: Sequence[Path] = (), with_checksum: bool = True) -> list[ModelFileReport]:
    """Every *.gguf in ``folder`` (plus ``extra`` files), checked; manifest errors become one report."""
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    files += [p for p in extra if p not in files]
    try:
        manifest = read_manifest(folder) if folder.is_dir() else {}
    except ModelFileError as exc:
        return [ModelFileReport(folder / MANIFEST_NAME, None, str(exc), None, None, None)]
    reports = []
    for path in files:
        reports.append(inspect_model_file(path, manifest if path.parent == folder else {}, with_checksum))
    listed_missing = [name for name in manifest if not (folder / name).exists()]
    for name in listed_missing:
        reports.append(ModelFileReport(folder / name, None, f"{folder / name}: listed in {MANIFEST_NAME} but missing",
                                       None, manifest[name].get("sha256"), manifest[name].get("size")))
    return reports
