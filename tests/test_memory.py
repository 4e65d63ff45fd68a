"""Memory estimate, budget (cgroup) and fit planning, on Qwen1.5-0.5B's exact shapes."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from edge.model.gguf_check import GGUFInfo, TensorEntry, check_gguf
from edge.model.memory import (PYTHON_RUNTIME_BYTES, cgroup_limit_bytes, effective_budget_bytes,
                               estimate_memory, kv_cache_bytes, plan_fit, repacked_bytes, retype_info)
from edge.model.preflight import ModelDoesNotFit, preflight
from edge.settings import SettingsError, load_settings

GIB = 1 << 30
MIB = 1 << 20
X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}

def qwen15_f32_info() -> GGUFInfo:
    h, ff, v, L = 1024, 2816, 151936, 24
    shapes = {"token_embd.weight": (h, v), "output.weight": (h, v), "output_norm.weight": (h,)}
    for i in range(L):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,),
                       p + "attn_q.weight": (h, h), p + "attn_k.weight": (h, h), p + "attn_v.weight": (h, h),
                       p + "attn_q.bias": (h,), p + "attn_k.bias": (h,), p + "attn_v.bias": (h,),
                       p + "attn_output.weight": (h, h), p + "ffn_gate.weight": (h, ff),
                       p + "ffn_up.weight": (h, ff), p + "ffn_down.weight": (ff, h)})
    tensors, off = [], 0
    for name, shape in shapes.items():
        n = 4
        for d in shape: n *= d
        tensors.append(TensorEntry(name, int(Q.F32), shape, off, n)); off += -(-n // 32) * 32
    data_offset = 6_000_000
    return GGUFInfo(path=Path("qwen15-f32.gguf"), size_bytes=data_offset + off, version=3, arch="qwen2",
                    file_type="f32", n_params=sum(t.nbytes // 4 for t in tensors), n_tensors=len(tensors),
                    n_layer=L, n_embd=h, n_head=16, n_head_kv=16, n_ctx_train=32768, n_vocab=v, n_ff=ff,
                    head_dim_k=64, head_dim_v=64, data_offset=data_offset, alignment=32,
                    tensor_bytes_by_type={"F32": off}, tensors=tuple(tensors), metadata={})


@pytest.fixture(scope="module")
def f32() -> GGUFInfo:
    return qwen15_f32_info()


def test_retyped_sizes_match_published_files(f32):
    # the published Qwen1.5-0.5B-Chat GGUFs: Q8_0 665 MB, Q4_K_M 407 MB
    assert retype_info(f32, "q8_0").size_bytes == pytest.approx(665e6, rel=0.02)
    assert retype_info(f32, "q4_k_m").size_bytes == pytest.approx(407e6, rel=0.03)
    assert f32.size_bytes == pytest.approx(2.48e9, rel=0.02)


def test_kv_cache_size(f32):
    # 24 layers × 2048 cells × 16 kv heads × (64 + 64) × 2 bytes = 192 MiB at f16; q8_0 is 34/64 of it
    assert kv_cache_bytes(f32, 2048, "f16") == 192 * MIB
    assert kv_cache_bytes(f32, 2048, "q8_0") == 102 * MIB
    assert kv_cache_bytes(f32, 2000, "f16") == kv_cache_bytes(f32, 2048, "f16")   # padded to 256 cells


def test_repack_counts_only_repackable_matrices(f32):
    q4 = retype_info(f32, "q4_k_m")
    expected = sum(t.nbytes for t in q4.tensors if t.type_name == "Q4_K" and t.name != "token_embd.weight")
    assert repacked_bytes(q4, X86_AVX2) == expected > 0
    assert repacked_bytes(q4, {}) == 0                              # e.g. a Raspberry Pi 4 (no dotprod)
    assert repacked_bytes(retype_info(f32, "q8_0"), X86_AVX2) == 0


def test_f32_refused_under_1gib_with_a_plan(f32):
    plan = plan_fit(f32, GIB, n_ctx=2048, kv_cache_type="f16", n_seq_max=8, repack_rows=X86_AVX2)
    assert not plan.fits and plan.estimate.total_bytes > 2 * GIB
    assert plan.suggestion is not None and plan.suggestion.total_bytes <= plan.limit_bytes <= 0.97 * GIB
    msg = plan.message
    assert msg.startswith("F32 with n_ctx 2048") and "budget 1.0 GiB" in msg
    assert f"use {plan.suggestion.file_type} with n_ctx {plan.suggestion.n_ctx} and kv_cache_type " \
           f"{plan.suggestion.kv_cache_type}" in msg
    assert plan.suggestion.file_type in ("q8_0", "q4_k_m")


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_files_fit_1gib_with_q8_kv(f32, quant):
    info = retype_info(f32, quant)
    plan = plan_fit(info, GIB, n_ctx=2048, kv_cache_type="q8_0", n_seq_max=8, repack_rows=X86_AVX2)
    assert plan.fits, plan.message
    assert "fits the budget" in plan.message


def test_q8_0_with_f16_kv_is_steered_to_q8_kv(f32):
    info = retype_info(f32, "q8_0")
    plan = plan_fit(info, GIB, n_ctx=2048, kv_cache_type="f16", n_seq_max=8, repack_rows=X86_AVX2)
    assert not plan.fits and plan.message.startswith("Q8_0 with n_ctx 2048 and kv_cache_type f16 needs 10")
    assert (plan.suggestion.file_type, plan.suggestion.n_ctx, plan.suggestion.kv_cache_type) == ("q8_0", 2048, "q8_0")


def test_tiny_budget_shrinks_context_then_gives_up(f32):
    info = retype_info(f32, "q4_k_m")
    plan = plan_fit(info, 900 * MIB, n_ctx=8192, kv_cache_type="f16", repack_rows=X86_AVX2)
    assert not plan.fits and plan.suggestion.n_ctx < 8192
    hopeless = plan_fit(info, 300 * MIB, n_ctx=2048, repack_rows=X86_AVX2)
    assert not hopeless.fits and hopeless.suggestion is None and "no quantization" in hopeless.message


def test_estimate_grows_with_context_and_batch(f32):
    info = retype_info(f32, "q4_k_m")
    small = estimate_memory(info, 1024, "q8_0", 512, repack_rows={})
    assert estimate_memory(info, 4096, "q8_0", 512, repack_rows={}).total_bytes > small.total_bytes
    assert estimate_memory(info, 1024, "q8_0", 1024, repack_rows={}).total_bytes > small.total_bytes
    assert estimate_memory(info, 1024, "q8_0", 512, flash_attn=False, repack_rows={}).total_bytes > small.total_bytes
    # the compute buffer follows the ubatch, which llama.cpp caps at the batch
    half = estimate_memory(info, 1024, "q8_0", 512, repack_rows={}, n_ubatch=256)
    assert half.compute_bytes < small.compute_bytes and half.kv_cache_bytes == small.kv_cache_bytes
    assert estimate_memory(info, 1024, "q8_0", 512, repack_rows={}, n_ubatch=4096).compute_bytes == small.compute_bytes
    with pytest.raises(ValueError):
        estimate_memory(info, 1024, "q4_0", repack_rows={})


@pytest.mark.parametrize("v2, v1, expected", [
    ("max\n", None, None),
    ("1073741824\n", None, GIB),
    (None, "536870912\n", 512 * MIB),
    (None, "9223372036854771712\n", None),        # cgroup v1 "unlimited"
    ("garbage", None, None),
    (None, None, None),
])
def test_cgroup_limit_parsing(tmp_path, v2, v1, expected):
    p2, p1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    if v2 is not None:
        p2.write_text(v2)
    if v1 is not None:
        p1.write_text(v1)
    assert cgroup_limit_bytes(p2, p1) == expected


def test_effective_budget_takes_the_lower():
    assert effective_budget_bytes(1024, cgroup_limit=512 * MIB) == 512 * MIB
    assert effective_budget_bytes(1024, cgroup_limit=4 * GIB) == GIB
    assert effective_budget_bytes(1024, cgroup_limit=None) == GIB


def test_preflight_refuses_before_loading(tmp_path, f32):
    from tests.gguf_fixtures import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    settings = load_settings(None)
    info, plan = preflight(path, settings, budget_bytes=GIB)
    assert info.arch == "qwen2" and plan.fits
    with pytest.raises(ModelDoesNotFit, match="needs"):
        preflight(path, settings, budget_bytes=64 * MIB)


@pytest.mark.realmodel
def test_estimate_within_10pct_of_measured_standin():
    path = os.environ.get("QWEN_EDGE_STANDIN_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("QWEN_EDGE_STANDIN_GGUF not set or missing")
    from edge.engine.config import RuntimeConfig
    from edge.engine.measure import measure_memory
    info = check_gguf(path)
    config = RuntimeConfig(n_ctx=512, kv_cache_type="q8_0", n_batch=256, n_ubatch=256, n_seq_max=2)
    got = measure_memory(path, config, timeout_s=240)
    est = estimate_memory(info, 512, "q8_0", 256, n_seq_max=2, runtime_bytes=PYTHON_RUNTIME_BYTES)
    assert got.n_tokens == 512
    assert abs(est.total_bytes - got.rss_bytes) / got.rss_bytes <= 0.10, (est.to_dict(), got)
    assert got.buffers_mib["kv_cache"] * MIB == pytest.approx(est.kv_cache_bytes, rel=0.02)


def test_cgroup_chain_takes_the_lowest_ancestor_limit(tmp_path):
    from edge.model.memory import cgroup_chain_limit
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "qwen-edge.service"
    service.mkdir(parents=True)
    (root / "system.slice" / "memory.max").write_text("805306368\n")       # 768 MiB on the slice
    (service / "memory.max").write_text("1073741824\n")                    # 1 GiB on the service
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/system.slice/qwen-edge.service\n")
    roots = {"v2": (root, "memory.max"), "v1": (tmp_path / "v1", "memory.limit_in_bytes")}
    assert cgroup_chain_limit(proc, roots) == 768 * MIB
    (root / "system.slice" / "memory.max").write_text("max\n")
    assert cgroup_chain_limit(proc, roots) == GIB
    # hybrid host: a v1 memory controller line with a lower limit wins
    v1 = tmp_path / "v1" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(512 * MIB))
    proc.write_text("4:memory:/box\n0::/system.slice/qwen-edge.service\n")
    assert cgroup_chain_limit(proc, roots) == 512 * MIB
    proc.write_text("0::/\n")
    assert cgroup_chain_limit(proc, roots) is None


def test_repacked_weights_count_twice_only_when_mapped(f32):
    q4, q8 = retype_info(f32, "q4_k_m"), retype_info(f32, "q8_0")
    read = estimate_memory(q4, 2048, "q8_0", repack_rows=X86_AVX2)
    mapped = estimate_memory(q4, 2048, "q8_0", repack_rows=X86_AVX2, mmap=True)
    assert read.repacked_bytes == 0 and mapped.repacked_bytes == repacked_bytes(q4, X86_AVX2)
    assert mapped.total_bytes - read.total_bytes == pytest.approx(140 * MIB, rel=0.02)  # llama.cpp's CPU_REPACK
    assert estimate_memory(q8, 2048, "q8_0", repack_rows=X86_AVX2, mmap=True).total_bytes == \
        estimate_memory(q8, 2048, "q8_0", repack_rows=X86_AVX2).total_bytes


def _settings(kv: str = "auto", flash_attn: bool = True):
    return load_settings(None, model={"kv_cache_type": kv, "n_ctx": 2048, "n_seq_max": 16, "flash_attn": flash_attn})


@pytest.mark.parametrize("quant, budget_mib, expected", [
    ("q4_k_m", 1024, "f16"),     # est. ~770 MiB with f16: under the soft limit (0.9 GiB)
    ("q8_0", 1024, "q8_0"),      # f16 would need ~1015 MiB
    ("q4_k_m", 800, "q8_0"),     # a smaller box: the smaller cache
])
def test_auto_kv_cache_type_takes_f16_only_under_the_soft_limit(f32, quant, budget_mib, expected):
    from edge.model.preflight import plan_for, resolve_kv_cache_type
    info = retype_info(f32, quant)
    budget = budget_mib * MIB
    assert resolve_kv_cache_type(info, _settings(), budget) == expected
    assert plan_for(info, _settings(), budget).estimate.kv_cache_type == expected
    assert resolve_kv_cache_type(info, _settings("q8_0"), 64 * GIB) == "q8_0"   # an explicit choice stands
    assert resolve_kv_cache_type(info, _settings("f16"), budget) == "f16"
    assert resolve_kv_cache_type(info, _settings(flash_attn=False), budget) == "f16"  # q8_0 V needs flash attention


def test_engine_runs_the_resolved_kv_cache_type(tiny_gguf):
    from edge.engine.engine import Engine
    from tests.engine_fixtures import tiny_settings
    roomy = Engine.load(tiny_gguf, tiny_settings())
    try:
        assert roomy.info()["kv_cache_type"] == "f16"
    finally:
        roomy.close()
    settings = tiny_settings()
    settings.memory.budget_mb = 64          # below the runtime's own footprint: auto falls back
    tight = Engine.load(tiny_gguf, settings)
    try:
        assert tight.info()["kv_cache_type"] == "q8_0"
        assert tight.classify("great").label in ("positive", "negative")
    finally:
        tight.close()


def test_auto_maps_the_file_only_when_the_untied_embedding_outweighs_the_repacked_weights(f32):
    from edge.model.preflight import resolve_mmap
    q4, q8 = retype_info(f32, "q4_k_m"), retype_info(f32, "q8_0")
    auto = load_settings(None).model
    assert auto.mmap == "auto"
    assert resolve_mmap(q8, auto, X86_AVX2) is True                  # nothing repacked: mapping only saves
    assert resolve_mmap(q4, auto, X86_AVX2) is False                 # 140 MiB repacked > 88 MB embedding
    assert resolve_mmap(q4, auto, {}) is True                        # a CPU that repacks nothing
    tied = replace(q8, tensors=tuple(t for t in q8.tensors if t.name != "output.weight"))
    assert tied.tied_embeddings and resolve_mmap(tied, auto, X86_AVX2) is False  # every row is used
    for forced in (True, False):
        assert resolve_mmap(q4, load_settings(None, model={"mmap": forced}).model, X86_AVX2) is forced
    # the setting also takes the environment's spelling
    assert load_settings(None, model={"mmap": "false"}).model.mmap is False
    with pytest.raises(SettingsError, match="must be auto, true or false"):
        load_settings(None, model={"mmap": "sometimes"})
