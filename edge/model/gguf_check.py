"""Validate a GGUF file in pure Python before llama.cpp sees it.

llama.cpp trusts much of a GGUF header: a hostile or damaged file can make it allocate absurd
amounts or read past the mapping and die with SIGSEGV, taking the daemon with it. So every count
and length here is bounded by the bytes actually left in the file *before* anything is allocated,
and every problem becomes one :class:`ModelFileError` line naming the file.

Only the header is read (a few MB for a Qwen vocabulary); tensor data is never touched.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)          # v1 had 32-bit counts; llama.cpp dropped it
SUPPORTED_ARCHS = ("qwen2",)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
# Far above any real model (Qwen1.5-0.5B: 291 tensors, ~25 keys), far below what breaks a reader.
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_KEY_BYTES = 65_536
MAX_NAME_BYTES = 64                  # GGML_MAX_NAME in ggml.h
MAX_STRING_BYTES = 64 << 20
MAX_SMALL_ARRAY = 4_096              # numeric arrays up to this length are kept in `metadata`

# value type id -> struct format (little endian); 8 = string, 9 = array are handled apart.
SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
STRING_TYPE, ARRAY_TYPE = 8, 9

# what we need from "{arch}.<key>" -> GGUFInfo field; a missing one is a refused file.
REQUIRED_ARCH_KEYS: dict[str, str] = {
    "context_length": "n_ctx_train",
    "embedding_length": "n_embd",
    "block_count": "n_layer",
    "attention.head_count": "n_head",
    "attention.head_count_kv": "n_head_kv",
}
TOKENS_KEY = "tokenizer.ggml.tokens"


class ModelFileError(ValueError):
    """A model file that must not be loaded; the message is one line naming the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ggml_type: int
    shape: tuple[int, ...]       # ne[0], ne[1], ... as in ggml (innermost first)
    offset: int                  # relative to the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    size_bytes: int
    version: int
    arch: str
    file_type: str               # "q4_k_m", "q8_0", "f32", ... ("unknown" when the key is absent)
    n_params: int
    n_tensors: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    n_vocab: int
    n_ff: int
    head_dim_k: int
    head_dim_v: int
    data_offset: int
    alignment: int
    tensor_bytes_by_type: dict[str, int]
    tensors: tuple[TensorEntry, ...] = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)     # scalars and small numeric arrays; token lists as counts

    @property
    def tensor_bytes(self) -> int:
        return sum(self.tensor_bytes_by_type.values())

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)


class _Cursor:
    """Bounds-checked little-endian reads over a read-only mapping."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what} at byte {self.pos} runs past the end "
                            f"of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > limit:
            raise self.fail(f"corrupt: {what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"corrupt: {what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        # Vocabularies hold ~150k strings: walk the lengths without building Python strings.
        buf, pos, size = self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of an item of {what}")
            (n,) = struct.unpack_from("<Q", buf, pos)
            if n > MAX_STRING_BYTES or pos + 8 + n > size:
                self.pos = pos
                raise self.fail(f"truncated or corrupt: an item of {what} at byte {pos} claims {n} bytes, "
                                f"past the end of the file ({size} bytes)")
            pos += 8 + n
        self.pos = pos


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in SCALAR_FORMATS:
        return cur.unpack(SCALAR_FORMATS[vtype], f"value of {key}")
    if vtype == STRING_TYPE:
        return cur.string(f"value of {key}")
    if vtype != ARRAY_TYPE:
        raise cur.fail(f"corrupt: key {key} has unknown value type {vtype}")
    item_type = cur.unpack("<I", f"item type of {key}")
    count = cur.unpack("<Q", f"item count of {key}")
    if item_type == STRING_TYPE:
        if count > (cur.size - cur.pos) // 8:        # each string needs at least its 8-byte length
            raise cur.fail(f"corrupt: array {key} claims {count} strings, more than the file can hold")
        cur.skip_strings(count, key)
        return _ArrayCount(count, STRING_TYPE)
    if item_type not in SCALAR_FORMATS:
        raise cur.fail(f"corrupt: array {key} has unsupported item type {item_type}")
    width = struct.calcsize(SCALAR_FORMATS[item_type])
    if count > (cur.size - cur.pos) // width:
        raise cur.fail(f"corrupt: array {key} claims {count} items, more than the file can hold")
    if count > MAX_SMALL_ARRAY:
        cur.pos += count * width
        return _ArrayCount(count, item_type)
    fmt = "<" + SCALAR_FORMATS[item_type][1] * count
    values = struct.unpack_from(fmt, cur.buf, cur.pos)
    cur.pos += count * width
    return list(values)


@dataclass(frozen=True)
class _ArrayCount:
    """A long array (or any string array) we walked over but did not keep."""
    count: int
    item_type: int


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    if cur.size < 4 or bytes(cur.buf[:4]) != GGUF_MAGIC:
        head = bytes(cur.buf[:4]) if cur.size else b""
        raise cur.fail(f"not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian file?)" if version > 0xFFFF else ""
        raise cur.fail(f"unsupported GGUF version {version}{hint}; supported: "
                       f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if not 0 < n_tensors <= MAX_TENSORS:
        raise cur.fail(f"corrupt: tensor count {n_tensors} (expected 1..{MAX_TENSORS})")
    if n_kv > MAX_KV:
        raise cur.fail(f"corrupt: metadata count {n_kv} (limit {MAX_KV})")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", limit=MAX_KEY_BYTES)
        vtype = cur.unpack("<I", f"value type of {key}")
        if key in meta:
            raise cur.fail(f"corrupt: duplicate metadata key {key}")
        meta[key] = _read_value(cur, vtype, key)
    return meta


def _tensor_nbytes(cur: _Cursor, name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"corrupt: tensor {name} has unknown ggml type {ggml_type}") from None
    if shape[0] % block:
        raise cur.fail(f"corrupt: tensor {name} row of {shape[0]} is not a multiple of "
                       f"{qtype.name}'s block size {block}")
    n_rows = 1
    for dim in shape[1:]:
        n_rows *= dim
    return shape[0] // block * type_size * n_rows


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[TensorEntry]:
    # each tensor info takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes
    if n_tensors > (cur.size - cur.pos) // 32:
        raise cur.fail(f"corrupt: tensor count {n_tensors} is more than the file can hold")
    entries, seen = [], set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", limit=MAX_KEY_BYTES)
        if len(name.encode()) >= MAX_NAME_BYTES:
            raise cur.fail(f"corrupt: tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES - 1} bytes")
        if name in seen:
            raise cur.fail(f"corrupt: duplicate tensor {name}")
        seen.add(name)
        n_dims = cur.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise cur.fail(f"corrupt: tensor {name} has {n_dims} dimensions (1..{GGML_MAX_DIMS})")
        shape = tuple(cur.unpack("<Q", f"shape of {name}") for _ in range(n_dims))
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if any(d == 0 for d in shape) or n_elements >= 1 << 62:
            raise cur.fail(f"corrupt: tensor {name} has shape {list(shape)}")
        ggml_type = cur.unpack("<I", f"type of {name}")
        offset = cur.unpack("<Q", f"data offset of {name}")
        nbytes = _tensor_nbytes(cur, name, ggml_type, shape)
        entries.append(TensorEntry(name, ggml_type, shape, offset, nbytes))
    return entries


def _check_tensor_data(cur: _Cursor, tensors: list[TensorEntry], data_offset: int, alignment: int) -> None:
    data_size = cur.size - data_offset
    if data_size < 0:
        raise cur.fail(f"truncated: tensor data would start at byte {data_offset}, "
                       f"past the end of the file ({cur.size} bytes)")
    spans = []
    for t in tensors:
        if t.offset % alignment:
            raise cur.fail(f"corrupt: tensor {t.name} data offset {t.offset} is not aligned to {alignment}")
        if t.offset + t.nbytes > data_size:
            raise cur.fail(f"truncated or corrupt: tensor {t.name} ({t.nbytes} bytes at data offset "
                           f"{t.offset}) ends past the end of the file ({cur.size} bytes)")
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise cur.fail(f"corrupt: tensors {name} and {other} overlap")


def _file_type_name(meta: dict[str, Any]) -> str:
    value = meta.get("general.file_type")
    try:
        name = LlamaFileType(int(value)).name  # type: ignore[arg-type]  # None: TypeError, handled below
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _positive_int(cur: _Cursor, meta: dict[str, Any], key: str, limit: int) -> int:
    value = meta.get(key)
    if value is None:
        raise cur.fail(f"missing required metadata key {key}")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise cur.fail(f"corrupt: metadata {key} = {value!r} (expected an integer 1..{limit})")
    return value


def _optional_int(cur: _Cursor, meta: dict[str, Any], key: str, default: int) -> int:
    return _positive_int(cur, meta, key, 1 << 24) if key in meta else default


def _build_info(cur: _Cursor, version: int, meta: dict[str, Any], tensors: list[TensorEntry],
                data_offset: int, alignment: int) -> GGUFInfo:
    arch = meta.get("general.architecture")
    if arch is None:
        raise cur.fail("missing required metadata key general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise cur.fail(f"architecture {arch!r} is not supported (qwen-edge serves {', '.join(SUPPORTED_ARCHS)})")
    dims = {fld: _positive_int(cur, meta, f"{arch}.{key}", 1 << 24) for key, fld in REQUIRED_ARCH_KEYS.items()}
    tokens = meta.get(TOKENS_KEY)
    if tokens is None:
        raise cur.fail(f"missing required metadata key {TOKENS_KEY}")
    if not isinstance(tokens, _ArrayCount) or tokens.item_type != STRING_TYPE or tokens.count == 0:
        raise cur.fail(f"corrupt: {TOKENS_KEY} is not a non-empty array of strings")
    n_vocab = tokens.count
    if dims["n_embd"] % dims["n_head"] or dims["n_head"] % dims["n_head_kv"]:
        raise cur.fail(f"corrupt: embedding_length {dims['n_embd']} / head_count {dims['n_head']} / "
                       f"head_count_kv {dims['n_head_kv']} do not divide evenly")
    head_dim = dims["n_embd"] // dims["n_head"]
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    n_params = 0
    for t in tensors:
        count = 1
        for d in t.shape:
            count *= d
        n_params += count
    kept = {k: (v.count if isinstance(v, _ArrayCount) else v) for k, v in meta.items()}
    info = GGUFInfo(
        path=cur.path, size_bytes=cur.size, version=version, arch=arch, file_type=_file_type_name(meta),
        n_params=n_params, n_tensors=len(tensors), n_vocab=n_vocab,
        n_ff=_optional_int(cur, meta, f"{arch}.feed_forward_length", 4 * dims["n_embd"]),
        head_dim_k=_optional_int(cur, meta, f"{arch}.attention.key_length", head_dim),
        head_dim_v=_optional_int(cur, meta, f"{arch}.attention.value_length", head_dim),
        data_offset=data_offset, alignment=alignment, tensor_bytes_by_type=by_type,
        tensors=tuple(tensors), metadata=kept, **dims,
    )
    _check_tensors_match_metadata(cur, info)
    return info


def _check_tensors_match_metadata(cur: _Cursor, info: GGUFInfo) -> None:
    """The tensor list must agree with block_count and the vocabulary: llama.cpp would otherwise
    refuse the file with a bare "failed to load model" (or, for a short token_embd, read past it)."""
    embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise cur.fail("missing tensor token_embd.weight")
    if embd.shape[:2] != (info.n_embd, info.n_vocab):
        raise cur.fail(f"corrupt: token_embd.weight is {list(embd.shape)}, expected "
                       f"[{info.n_embd}, {info.n_vocab}] (embedding_length, tokens in the vocabulary)")
    layers = set()
    for t in info.tensors:
        head, _, rest = t.name.partition(".")
        index = rest.partition(".")[0]
        if head == "blk" and index.isdigit():
            layers.add(int(index))
    if layers - set(range(info.n_layer)):
        raise cur.fail(f"corrupt: block_count is {info.n_layer} but there are tensors for layer "
                       f"{max(layers)} (layers 0..{max(layers)} in the file)")
    missing = sorted(set(range(info.n_layer)) - layers)
    if missing:
        raise cur.fail(f"corrupt: block_count is {info.n_layer} but {len(missing)} of its layers have no "
                       f"tensors (the first is layer {missing[0]})")


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and validate ``path``'s header; return what the estimator and doctor need.

    Raises ModelFileError (one line naming the file) on any problem; never lets llama.cpp see it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ModelFileError(f"{path}: empty file (0 bytes), not a GGUF model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse(cur: _Cursor) -> GGUFInfo:
    version, n_tensors, n_kv = _read_header(cur)
    meta = _read_metadata(cur, n_kv)
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > 1 << 20:
        raise cur.fail(f"corrupt: general.alignment = {alignment!r} (expected a power of two)")
    tensors = _read_tensor_infos(cur, n_tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    _check_tensor_data(cur, tensors, data_offset, alignment)
    info = _build_info(cur, version, meta, tensors, data_offset, alignment)
    log.debug("checked %s: %s %s, %d tensors, %d params", info.path, info.arch, info.file_type,
              info.n_tensors, info.n_params)
    return info
