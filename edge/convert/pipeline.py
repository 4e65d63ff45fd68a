"""Source → checked input → F32 GGUF → Q8_0 / Q4_K_M → verified, atomically named, in manifest.json.

Everything that can be wrong with the input (architecture, files, headers, tokenizer size) is
checked before the first byte is written. Each output is written under a hidden temporary name,
verified with llama.cpp, then renamed; the temporary files are removed on any error or interrupt.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from edge.convert import hf_source
from edge.convert.errors import ConversionError
from edge.convert.gguf_writer import write_f32_gguf
from edge.convert.manifest import MANIFEST_NAME, Manifest, OutputEntry, sha256_of
from edge.convert.quantize import QUANT_FTYPES, quantize_gguf
from edge.convert.safetensors_reader import SafetensorsCheckpoint
from edge.convert.tensor_names import Hyperparams, read_hyperparams, tensor_plan
from edge.convert.verify import verify_gguf
from edge.convert.vocab import BpeVocab, load_vocab
from edge.settings import DEFAULT_REPO, DEFAULT_REVISION

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("f32", *QUANT_FTYPES)  # written in this order: quantized files start from the F32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ConvertRequest:
    out_dir: Path
    types: tuple[str, ...] = OUTPUT_TYPES
    name: str | None = None
    from_dir: Path | None = None        # set: convert this folder; else download repo@revision
    repo: str = DEFAULT_REPO
    revision: str = DEFAULT_REVISION
    n_threads: int = 0
    progress: bool = False


@dataclass
class ConvertResult:
    manifest: Path
    written: list[OutputEntry] = field(default_factory=list)
    skipped: list[OutputEntry] = field(default_factory=list)


@dataclass(frozen=True)
class CheckedInput:
    source: hf_source.Source
    hp: Hyperparams
    checkpoint: SafetensorsCheckpoint
    plan: list[tuple[str, str]]
    vocab: BpeVocab


def output_name(name: str, out_type: str) -> str:
    return f"{name}-{out_type}.gguf"


def _check_request(req: ConvertRequest) -> str:
    unknown = [t for t in req.types if t not in OUTPUT_TYPES]
    if unknown or not req.types:
        raise ConversionError(f"unknown output type {','.join(unknown) or '(none)'} "
                              f"(choose from {','.join(OUTPUT_TYPES)})")
    name = req.name or (req.from_dir.resolve().name if req.from_dir else req.repo.split("/")[-1]).lower()
    if not NAME_PATTERN.match(name):
        raise ConversionError(f"invalid output name {name!r} (letters, digits, '.', '_', '-')")
    return name


def check_input(source: hf_source.Source) -> CheckedInput:
    hp = read_hyperparams(source.folder)
    checkpoint = SafetensorsCheckpoint.open(source.folder)
    shapes = {n: e.shape for n, e in checkpoint.entries.items()}
    plan = tensor_plan(hp, shapes, source.folder)
    vocab = load_vocab(source.folder, hp.vocab_size)
    return CheckedInput(source, hp, checkpoint, plan, vocab)


@contextmanager
def _temporary(out_dir: Path, final_name: str) -> Iterator[Path]:
    """A hidden temporary path beside the final one, removed whatever happens."""
    tmp = out_dir / f".{final_name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except OSError as exc:  # disk full, file too large, I/O error: one line naming the output
        raise ConversionError(f"cannot write {out_dir / final_name}: {exc.strerror or exc} (disk full or "
                              "write error); nothing was kept under that name") from None
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(out_dir: Path, name: str) -> None:
    # a run killed while writing a model or the manifest leaves its temporary (never the final name)
    for pattern in (f".{name}-*.gguf.tmp-*", f".{MANIFEST_NAME}.tmp-*"):
        for stale in out_dir.glob(pattern):
            logger.info("removing %s left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


def _finish(tmp: Path, final: Path, out_type: str, source_key: str, ci: CheckedInput) -> OutputEntry:
    check = verify_gguf(tmp, len(ci.plan), ci.hp.vocab_size, ci.vocab.stop_ids)
    entry = OutputEntry(file=final.name, type=out_type, size=tmp.stat().st_size, sha256=sha256_of(tmp),
                        tensor_count=check.tensor_count, source_key=source_key)
    os.replace(tmp, final)
    return entry


def _write_f32(ci: CheckedInput, tmp: Path, name: str, progress: bool) -> None:
    if not progress:
        write_f32_gguf(tmp, ci.checkpoint, ci.plan, ci.hp, ci.vocab, name)
        return
    from tqdm import tqdm

    total = sum(ci.checkpoint.entries[hf].n_elements * 4 for _, hf in ci.plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}-f32") as bar:
        write_f32_gguf(tmp, ci.checkpoint, ci.plan, ci.hp, ci.vocab, name, progress=bar.update)


def run_conversion(req: ConvertRequest) -> ConvertResult:
    """Produce the requested outputs in `req.out_dir`, skipping those the manifest says are done."""
    name = _check_request(req)
    source = hf_source.local(req.from_dir) if req.from_dir else hf_source.download(req.repo, req.revision)
    ci = check_input(source)
    req.out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(req.out_dir, name)
    manifest = Manifest(req.out_dir, source.description | {"name": name})
    result = ConvertResult(manifest=manifest.path)
    quant_key = f"{source.key}+llama.cpp:{llama_cpp.__version__}"
    todo_quants = [t for t in OUTPUT_TYPES[1:] if t in req.types and not _skip(manifest, t, quant_key, result)]
    need_f32 = "f32" in req.types or bool(todo_quants)
    f32_done = _skip(manifest, "f32", source.key, result) if need_f32 else None
    f32_final = req.out_dir / output_name(name, "f32")
    with _temporary(req.out_dir, f32_final.name) as f32_tmp:
        f32_input = f32_final
        if need_f32 and f32_done is None:
            _write_f32(ci, f32_tmp, name, req.progress)
            if "f32" in req.types:
                _record(manifest, result, _finish(f32_tmp, f32_final, "f32", source.key, ci))
            else:
                f32_input = f32_tmp  # only the quantizer's input: removed at the end
        for out_type in todo_quants:
            final = req.out_dir / output_name(name, out_type)
            with _temporary(req.out_dir, final.name) as tmp:
                quantize_gguf(f32_input, tmp, out_type, req.n_threads)
                _record(manifest, result, _finish(tmp, final, out_type, quant_key, ci))
    if "f32" not in req.types and f32_done is not None:
        result.skipped.remove(f32_done)  # used as input, not requested
    manifest.save()
    return result


def _record(manifest: Manifest, result: ConvertResult, entry: OutputEntry) -> None:
    manifest.record(entry)
    result.written.append(entry)


def _skip(manifest: Manifest, out_type: str, key: str, result: ConvertResult) -> OutputEntry | None:
    entry = manifest.matching(out_type, key)
    if entry is not None:
        logger.info("%s is up to date (manifest), skipping", entry.file)
        result.skipped.append(entry)
    return entry
