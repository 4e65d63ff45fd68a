"""The GGUF pre-check refuses damaged and hostile files with one clear line, before llama.cpp."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.model.gguf_check import ModelFileError, check_gguf
from tests.gguf_fixtures import N_EMBD, N_LAYER, N_VOCAB, REQUIRED, write_tiny_gguf

@pytest.fixture(scope="module")
def standin_gguf() -> Path:
    path = os.environ.get("QWEN_EDGE_STANDIN_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("QWEN_EDGE_STANDIN_GGUF not set or missing")
    return Path(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def mutate(src: Path, dst: Path, at: int, new: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[at:at + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def tensor_info_pos(data: bytes, name: str) -> int:
    """Offset of the field after a tensor's name (n_dims)."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def test_valid_file_reports_shapes(tiny):
    info = check_gguf(tiny)
    assert (info.arch, info.n_embd, info.n_layer, info.n_head, info.n_head_kv) == ("qwen2", 64, 2, 4, 2)
    assert info.n_vocab == N_VOCAB and info.n_ctx_train == 512 and info.n_tensors == 1 + 2 * N_LAYER
    assert info.file_type == "q8_0"
    assert info.n_params == N_VOCAB * N_EMBD + N_LAYER * (N_EMBD + N_EMBD * N_EMBD)
    assert info.tensor_bytes_by_type["Q8_0"] == N_LAYER * N_EMBD * N_EMBD // 32 * 34
    assert info.tied_embeddings


@pytest.mark.parametrize("kw, message", [
    ({"layers": N_LAYER - 1}, f"block_count is {N_LAYER} but 1 of its layers have no tensors .the first is layer 1"),
    ({"layers": N_LAYER + 1}, f"block_count is {N_LAYER} but there are tensors for layer {N_LAYER}"),
    ({"embd_rows": N_VOCAB - 1}, f"token_embd.weight is \\[{N_EMBD}, {N_VOCAB - 1}\\], expected \\[{N_EMBD}, {N_VOCAB}\\]"),
])
def test_tensors_must_match_block_count_and_vocabulary(tmp_path, kw, message):
    path = write_tiny_gguf(tmp_path / "mismatch.gguf", **kw)
    with pytest.raises(ModelFileError, match=message):
        check_gguf(path)


@pytest.mark.realmodel
def test_standin_checks(standin_gguf):
    info = check_gguf(standin_gguf)
    assert info.arch == "qwen2" and info.n_layer == 24 and info.n_vocab == 151936 and info.n_tensors == 291


def test_truncated_at_many_offsets(tiny, tmp_path):
    data = tiny.read_bytes()
    info = check_gguf(tiny)
    last_end = info.data_offset + max(t.offset + t.nbytes for t in info.tensors)
    offsets = sorted(set(range(1, info.data_offset, 37)) | {4, 8, 16, 24, info.data_offset, last_end - 1})
    for cut in offsets:
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as exc:
            check_gguf(bad)
        msg = str(exc.value)
        assert msg.startswith(f"{bad}: ") and "\n" not in msg, (cut, msg)
        assert any(w in msg for w in ("truncated", "past the end", "not a GGUF", "more than the file")), (cut, msg)


@pytest.mark.parametrize("case, expected", [
    ("magic", "not a GGUF file"),
    ("version1", "unsupported GGUF version 1"),
    ("version_big_endian", "big-endian"),
    ("arch", "architecture 'llama' is not supported"),
    ("n_tensors", "tensor count"),
    ("n_kv", "metadata count"),
    ("key_length", "claims"),
    ("tensor_past_eof", "ends past the end of the file"),
    ("tensor_type", "unknown ggml type 99"),
    ("n_dims", "dimensions"),
    ("dim_zero", "has shape"),
    ("dim_huge", "has shape"),
    ("misaligned", "not aligned"),
    ("token_count", "more than the file can hold"),
])
def test_corrupt_header(tiny, tmp_path, case, expected):
    data = tiny.read_bytes()
    bad = tmp_path / f"{case}.gguf"
    q = tensor_info_pos(data, "blk.1.attn_q.weight")           # n_dims u32, 2×u64 dims, type u32, offset u64
    tokens_at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
    edits = {
        "magic": (0, b"GGML"),
        "version1": (4, struct.pack("<I", 1)),
        "version_big_endian": (4, struct.pack(">I", 3)),
        "arch": (data.index(b"general.architecture") + len(b"general.architecture") + 4 + 8, b"llama"),
        "n_tensors": (8, struct.pack("<Q", 1 << 40)),
        "n_kv": (16, struct.pack("<Q", 1 << 40)),
        "key_length": (24, struct.pack("<Q", 1 << 50)),
        "tensor_past_eof": (q + 4 + 16 + 4, struct.pack("<Q", 1 << 20)),
        "tensor_type": (q + 4 + 16, struct.pack("<I", 99)),
        "n_dims": (q, struct.pack("<I", 5)),
        "dim_zero": (q + 4, struct.pack("<Q", 0)),
        "dim_huge": (q + 4 + 8, struct.pack("<Q", 1 << 62)),
        "misaligned": (q + 4 + 16 + 4, struct.pack("<Q", 8)),
        "token_count": (tokens_at, struct.pack("<Q", 1 << 45)),
    }
    at, new = edits[case]
    mutate(tiny, bad, at, new)
    with pytest.raises(ModelFileError) as exc:
        check_gguf(bad)
    msg = str(exc.value)
    assert expected in msg and msg.startswith(str(bad)) and "\n" not in msg


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_required_key(tmp_path, missing):
    path = write_tiny_gguf(tmp_path / f"no_{missing}.gguf", skip=(missing,))
    with pytest.raises(ModelFileError, match="missing required metadata key"):
        check_gguf(path)


def test_wrong_arch_written_by_writer(tmp_path):
    with pytest.raises(ModelFileError, match="'llama' is not supported"):
        check_gguf(write_tiny_gguf(tmp_path / "llama.gguf", arch="llama"))


@pytest.mark.parametrize("make, expected", [
    (lambda p: p, "model file not found"),
    (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (lambda p: (p.write_bytes(b"GGUF"), p)[1], "truncated"),
    (lambda p: (p.write_text("{\"not\": \"a model\"}"), p)[1], "not a GGUF file"),
])
def test_not_a_model(tmp_path, make, expected):
    path = make(tmp_path / "x.gguf")
    with pytest.raises(ModelFileError, match=expected):
        check_gguf(path)


def test_overlapping_tensors(tiny, tmp_path):
    data = tiny.read_bytes()
    info = check_gguf(tiny)
    first = next(t for t in info.tensors if t.name == "blk.1.attn_q.weight")
    other = next(t for t in info.tensors if t.name == "blk.0.attn_q.weight")
    at = tensor_info_pos(data, first.name) + 4 + 16 + 4
    with pytest.raises(ModelFileError, match="overlap"):
        check_gguf(mutate(tiny, tmp_path / "overlap.gguf", at, struct.pack("<Q", other.offset)))


def test_corrupt_files_never_reach_llama_cpp(tiny, tmp_path):
    """In a fresh interpreter: every refusal happens without llama_cpp ever being imported."""
    data = tiny.read_bytes()
    files = []
    for i, (at, new) in enumerate([(0, b"XXXX"), (8, struct.pack("<Q", 1 << 40)), (24, struct.pack("<Q", 1 << 50))]):
        files.append(str(mutate(tiny, tmp_path / f"c{i}.gguf", at, new)))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    files.append(str(cut))
    code = ("import json, sys\nfrom edge.model import ModelFileError, check_gguf\nout = []\n"
            "for f in sys.argv[1:]:\n    try:\n        check_gguf(f); out.append('accepted')\n"
            "    except ModelFileError as e:\n        out.append(str(e))\n"
            "print(json.dumps({'messages': out, 'llama_cpp_loaded': 'llama_cpp' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["llama_cpp_loaded"] is False
    assert all(m != "accepted" for m in result["messages"]) and len(result["messages"]) == 4


def test_token_list_must_be_strings(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "numeric_tokens.gguf"
    w = GGUFWriter(str(path), "qwen2")
    w.add_context_length(512)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_array("tokenizer.ggml.tokens", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.zeros((3, N_EMBD), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="not a non-empty array of strings"):
        check_gguf(path)


def test_random_header_damage_only_ever_gives_model_file_error(tiny, tmp_path):
    """600 seeded random corruptions of the header: a clean refusal or a valid parse, nothing else."""
    import random
    data = tiny.read_bytes()
    header_end = check_gguf(tiny).data_offset
    rng = random.Random(1234)
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"refused": 0, "accepted": 0}
    for _ in range(600):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header_end)
            buf[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        bad.write_bytes(bytes(buf))
        try:
            check_gguf(bad)
            outcomes["accepted"] += 1
        except ModelFileError as exc:
            assert str(exc).startswith(str(bad)) and "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 300, outcomes


def test_optional_dimension_of_wrong_type(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "ff_string.gguf"
    w = GGUFWriter(str(path), "qwen2")
    for add, value in ((w.add_context_length, 512), (w.add_embedding_length, N_EMBD), (w.add_block_count, 1),
                       (w.add_head_count, 4), (w.add_head_count_kv, 4)):
        add(value)
    w.add_string("qwen2.feed_forward_length", "lots")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, N_EMBD), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="feed_forward_length = 'lots'"):
        check_gguf(path)
