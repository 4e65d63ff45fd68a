"""Read safetensors checkpoints (single file or sharded with an index) by parsing headers ourselves.

Every header is checked against its file size before any data is read, so a truncated or corrupt
file is reported by name up front. Tensor data is then read in row chunks by offset and widened to
float32 chunk by chunk: peak memory is one chunk, not one tensor (the 151,936 x 1,024 embedding is
622 MB in F32), and no page of the source stays mapped afterwards.
"""
from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.convert.errors import ConversionError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 32 * 1024 * 1024  # float32 bytes produced per read


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


# safetensors dtype -> (numpy dtype on disk, widening to float32)
SOURCE_DTYPES: dict[str, tuple[np.dtype, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (np.dtype("<f4"), lambda a: a.astype(np.float32, copy=False)),
    "F16": (np.dtype("<f2"), lambda a: a.astype(np.float32)),
    "BF16": (np.dtype("<u2"), _bf16_to_f32),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header "
                                  f"(declares {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, info, 8 + n) for name, info in header.items()}
    end = max((e.offset + e.nbytes for e in entries.values()), default=8 + n)
    if end > size:
        raise ConversionError(f"{path}: truncated safetensors file: data needs {end} bytes, file has {size}")
    return entries


def _entry(path: Path, name: str, info: dict, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
    if dtype not in SOURCE_DTYPES:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype} "
                              f"(supported: {', '.join(SOURCE_DTYPES)})")
    nbytes = math.prod(shape) * SOURCE_DTYPES[dtype][0].itemsize
    if stop - begin != nbytes or begin < 0:
        raise ConversionError(f"{path}: corrupt safetensors header: tensor {name} spans {stop - begin} bytes, "
                              f"its shape needs {nbytes}")
    return TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, by HF name, readable one at a time."""

    def __init__(self, entries: dict[str, TensorEntry], files: list[Path]) -> None:
        self.entries = entries
        self.files = files

    @classmethod
    def open(cls, folder: Path) -> SafetensorsCheckpoint:
        files = _weight_files(folder)
        entries: dict[str, TensorEntry] = {}
        for path in files:
            entries.update(_read_header(path))
        index = folder / INDEX_NAME
        if index.is_file():
            _check_index(index, entries)
        logger.info("checkpoint %s: %d tensors in %d file(s)", folder, len(entries), len(files))
        return cls(entries, files)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def iter_f32_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The tensor as float32, flattened, in consecutive chunks of whole rows."""
        e = self.entries[name]
        disk_dtype, widen = SOURCE_DTYPES[e.dtype]
        row = e.shape[-1] if e.shape else 1
        rows_per_chunk = max(1, chunk_bytes // (4 * max(row, 1)))
        step = rows_per_chunk * row
        with open(e.file, "rb") as f:
            f.seek(e.offset)
            for start in range(0, e.n_elements, step):
                count = min(step, e.n_elements - start)
                raw = np.fromfile(f, dtype=disk_dtype, count=count)
                if raw.size != count:  # the file shrank since its header was checked
                    raise ConversionError(f"{e.file}: truncated while reading tensor {name}")
                yield widen(raw)

    def read_f32(self, name: str) -> np.ndarray:
        """The whole tensor as float32 in its shape (for small tensors and checks)."""
        e = self.entries[name]
        return np.concatenate(list(self.iter_f32_chunks(name))).reshape(e.shape)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(f"{index}: corrupt index (no weight_map)") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ConversionError(f"{path}: missing shard listed in {INDEX_NAME}")
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ConversionError(f"{folder}: no safetensors weights (need {SINGLE_NAME} or {INDEX_NAME})")
    return found


def _check_index(index: Path, entries: dict[str, TensorEntry]) -> None:
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, fname in weight_map.items():
        if name not in entries or entries[name].file.name != fname:
            raise ConversionError(f"{index.parent / fname}: tensor {name} listed in {INDEX_NAME} is not in that file")
