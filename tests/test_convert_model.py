"""The converted GGUF computes what the HF checkpoint computes, for every supported layout.

A numpy forward pass of the tiny checkpoint (tests/qwen2_reference.py) is compared with llama.cpp
running our F32 GGUF (F32 KV cache, so the only difference is float32 arithmetic), then the Q8_0
and Q4_K_M files are checked for closeness and for llama.cpp's per-tensor type choices.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from qwen2_reference import forward
from tiny_checkpoint import TinySpec, build_tiny_checkpoint

from edge.convert.pipeline import ConvertRequest, run_conversion
from edge.convert.safetensors_reader import SafetensorsCheckpoint

PROMPT_IDS = [5, 100, 200, 300, 400, 17, 650, 700, 12, 99, 256, 3, 757, 198, 755]
GGML_TYPE_F32 = 0

VARIANTS = {
    "mha-untied-f32": TinySpec(),
    "gqa-tied-bf16-sharded": TinySpec(kv_heads=2, tied=True, dtype="BF16", shards=3, seed=1),
    "gqa-untied-f16": TinySpec(kv_heads=1, dtype="F16", seed=2),
    "mha-tied-bf16-vocab-merges": TinySpec(tied=True, dtype="BF16", tokenizer_files="vocab_merges", seed=3),
}


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, type_k=GGML_TYPE_F32,
                          type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted_variant(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ck = build_tiny_checkpoint(root / "hf", VARIANTS[request.param])
    run_conversion(ConvertRequest(out_dir=root / "out", from_dir=ck.path, name="v", types=("f32",)))
    return ck, root / "out" / "v-f32.gguf"


def test_f32_logits_match_numpy_reference(converted_variant):
    ck, path = converted_variant
    ref = forward(ck.weights, ck.config, PROMPT_IDS)
    got = llama_logits(path, PROMPT_IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_f32_tensors_equal_source_exactly(converted_variant):
    ck, path = converted_variant
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 12 * ck.spec.layers - (1 if ck.spec.tied else 0)
    assert ("output.weight" in tensors) == (not ck.spec.tied)
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.1.attn_k.bias": "model.layers.1.self_attn.k_proj.bias",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight", "output_norm.weight": "model.norm.weight"}
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ck.weights[hf_name].shape), ck.weights[hf_name])


def test_reader_widens_bf16_and_f16_exactly(converted_variant):
    ck, _ = converted_variant
    checkpoint = SafetensorsCheckpoint.open(ck.path)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"):
        np.testing.assert_array_equal(checkpoint.read_f32(name), ck.weights[name])
    # chunked reading gives the same values as one read
    chunks = list(checkpoint.iter_f32_chunks("model.embed_tokens.weight", chunk_bytes=4096))
    assert len(chunks) > 1
    np.testing.assert_array_equal(np.concatenate(chunks), ck.weights["model.embed_tokens.weight"].ravel())


def test_q8_0_is_close_to_reference(tiny_checkpoint, tiny_gguf_q8):
    ref = forward(tiny_checkpoint.weights, tiny_checkpoint.config, PROMPT_IDS)
    got = llama_logits(tiny_gguf_q8, PROMPT_IDS)
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_quantized_files_have_llama_cpp_types(tiny_checkpoint, tiny_gguf_q8, tiny_gguf_q4):
    q8, q4 = _types(tiny_gguf_q8), _types(tiny_gguf_q4)
    matrices = [n for n in q8 if not n.endswith(("norm.weight", ".bias"))]
    assert all(q8[n] == "Q8_0" for n in matrices)
    assert all(q8[n] == "F32" and q4[n] == "F32" for n in q8 if n not in matrices)
    # llama.cpp's Q4_K_M mix: Q6_K for output.weight and for attn_v / ffn_down in some layers, Q4_K elsewhere
    assert q4["output.weight"] == "Q6_K"
    assert {q4[n] for n in matrices} == {"Q4_K", "Q6_K"}
    assert sum(q4[n] == "Q4_K" for n in matrices) > len(matrices) // 2
    assert all(q4[n] == "Q4_K" for n in matrices if "attn_q" in n or "ffn_gate" in n or "ffn_up" in n)
    ref = forward(tiny_checkpoint.weights, tiny_checkpoint.config, PROMPT_IDS)
    got = llama_logits(tiny_gguf_q4, PROMPT_IDS)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9


def test_q4_k_m_falls_back_where_rows_are_not_multiples_of_256(tmp_path):
    """What llama.cpp really does with k-quants on 128-wide rows: a legacy type, never a K type."""
    ck = build_tiny_checkpoint(tmp_path / "hf", TinySpec(hidden=128, intermediate=256, heads=2, kv_heads=2))
    run_conversion(ConvertRequest(out_dir=tmp_path / "out", from_dir=ck.path, name="n", types=("q4_k_m",)))
    types = _types(tmp_path / "out" / "n-q4_k_m.gguf")
    reader = gguf.GGUFReader(tmp_path / "out" / "n-q4_k_m.gguf")
    assert int(reader.fields["general.file_type"].parts[-1][0]) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    widths = {t.name: int(t.shape[0]) for t in reader.tensors}
    for name, kind in types.items():
        if widths[name] % 256:
            assert not kind.endswith("_K"), (name, kind)
    assert types["blk.0.ffn_down.weight"] in {"Q6_K", "Q4_K"}  # 256-wide rows: K types apply
    assert not (tmp_path / "out" / "n-f32.gguf").exists()  # F32 only an intermediate here
