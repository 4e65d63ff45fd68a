"""`qwen-edge doctor`: a crashing build probe, checksums, corrupt files; exit codes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli.doctor_cmd import doctor
from edge.model import cpu as cpu_mod

from tests.gguf_fixtures import write_tiny_gguf

SELF_KILL = ("import os, signal; print('SYSTEM_INFO:CPU : AVX2 = 1 | AMX_INT8 = 1 |', flush=True); "
             "os.kill(os.getpid(), signal.{})")


def self_killing_probe(sig: str) -> list[str]:
    return [sys.executable, "-c", SELF_KILL.format(sig)]


@pytest.mark.parametrize("sig", ["SIGILL", "SIGSEGV"])
def test_probe_crash_is_reported_unsafe(sig):
    result = cpu_mod.run_probe(self_killing_probe(sig), timeout_s=30)
    assert result.safe is False and result.returncode == -getattr(signal, sig)
    assert "unsafe build" in result.message and sig in result.message and "scripts/setup.sh" in result.message
    assert result.system_info["AMX_INT8"] == "1"


def test_probe_other_failures_are_not_called_unsafe():
    failed = cpu_mod.run_probe([sys.executable, "-c", "import sys; sys.exit('probe: could not load x')"], 30)
    assert failed.safe is None and "could not load x" in failed.message
    hung = cpu_mod.run_probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert hung.safe is None and "did not finish" in hung.message
    ok = cpu_mod.run_probe([sys.executable, "-c", "print('SYSTEM_INFO:CPU : AVX = 1 |'); print('DECODE_OK')"], 30)
    assert ok.safe is True and ok.decoded


def test_cpuinfo_parsing_and_repack_table(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx avx2 fma amx_tile amx_int8\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    info = cpu_mod.read_cpu_info(x86, machine="x86_64")
    assert info.model_name == "Test CPU" and "amx_int8" in info.flags and "fpu" in info.flags
    assert "Q4_K" in cpu_mod.repacked_types(info.flags) and "Q2_K" not in cpu_mod.repacked_types(info.flags)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\n")
    pi5 = cpu_mod.read_cpu_info(arm, machine="aarch64")
    assert {"Q4_0", "Q8_0", "Q6_K"} <= set(cpu_mod.repacked_types(pi5.flags))
    assert cpu_mod.repacked_types({"fp", "asimd"}) == {}        # Raspberry Pi 4: no dotprod, no repack
    build = cpu_mod.parse_system_info("CPU : AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    assert cpu_mod.build_features_missing_on_cpu(build, info) == ["AVX512"]


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    good = write_tiny_gguf(folder / "model-q8_0.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    manifest = {"files": [{"file": good.name, "type": "q8_0", "size": good.stat().st_size, "sha256": digest,
                           "tensor_count": 5}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def invoke(monkeypatch, model_dir: Path, probe: list[str], *args: str):
    monkeypatch.setattr(cpu_mod, "probe_command", lambda model, python=sys.executable: probe)
    return CliRunner().invoke(doctor, ["--model-dir", str(model_dir), *args], catch_exceptions=False)


OK_PROBE = [sys.executable, "-c", "print('SYSTEM_INFO:CPU : SSE3 = 1 |'); print('DECODE_OK')"]


def test_doctor_all_good(monkeypatch, model_dir):
    result = invoke(monkeypatch, model_dir, OK_PROBE)
    assert result.exit_code == 0, result.output
    assert "matches manifest" in result.output and "all good" in result.output
    report = json.loads(invoke(monkeypatch, model_dir, OK_PROBE, "--json").output)
    assert report["ok"] and report["models"][0]["checksum_ok"] is True and report["cpu"]["safe"] is True
    assert report["models"][0]["estimate"]["total_bytes"] > 0


def test_doctor_unsafe_build_exits_nonzero(monkeypatch, model_dir):
    result = invoke(monkeypatch, model_dir, self_killing_probe("SIGILL"))
    assert result.exit_code == 1
    assert "unsafe build" in result.output and "SIGILL" in result.output and "PROBLEMS FOUND" in result.output


def test_doctor_checksum_mismatch(monkeypatch, model_dir):
    path = model_dir / "model-q8_0.gguf"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                                   # tensor data changed, header still valid
    path.write_bytes(bytes(data))
    result = invoke(monkeypatch, model_dir, OK_PROBE)
    assert result.exit_code == 1 and "MISMATCH with manifest" in result.output


def test_doctor_corrupt_model_file(monkeypatch, model_dir):
    (model_dir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    result = invoke(monkeypatch, model_dir, OK_PROBE)
    assert result.exit_code == 1 and "broken.gguf: truncated" in result.output


@pytest.mark.realmodel
def test_doctor_real_probe_with_standin():
    path = os.environ.get("QWEN_EDGE_STANDIN_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("QWEN_EDGE_STANDIN_GGUF not set or missing")
    result = cpu_mod.run_probe(cpu_mod.probe_command(Path(path)), timeout_s=120)
    assert result.safe is True and result.decoded, result.message
    assert result.system_info.get("AVX") in ("0", "1") or result.system_info.get("NEON") in ("0", "1")


def test_doctor_size_mismatch_without_checksums(monkeypatch, model_dir):
    path = model_dir / "model-q8_0.gguf"
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)                           # still a valid GGUF, but not the file the manifest lists
    result = invoke(monkeypatch, model_dir, OK_PROBE, "--no-checksum")
    assert result.exit_code == 1 and "MISMATCH with manifest" in result.output


def test_doctor_model_listed_but_missing(monkeypatch, model_dir):
    (model_dir / "model-q8_0.gguf").unlink()
    result = invoke(monkeypatch, model_dir, OK_PROBE)
    assert result.exit_code == 1 and "listed in manifest.json but missing" in result.output
