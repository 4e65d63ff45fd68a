"""What this CPU can run, what the installed llama.cpp build uses, and whether the two agree.

A llama.cpp built for instructions the machine will not execute dies with SIGILL (or SIGSEGV for
AMX tiles a VM advertises but does not enable) on the first decode, so the build is judged by
running a decode in a *child* process and reading how it ended; the caller never loads anything.
"""
from __future__ import annotations

import functools
import logging
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags worth showing (x86-64 and aarch64 spellings)
INTERESTING_FLAGS = (
    "sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16",
)
# llama_print_system_info() name -> the /proc/cpuinfo flag the CPU must have for it
BUILD_FEATURE_FLAGS: dict[str, str] = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "AMX_BF16": "amx_bf16", "NEON": "asimd", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "SVE2": "sve2", "FP16_VA": "asimdhp",
}
# Types llama.cpp's CPU backend repacks into an extra buffer (ggml-cpu/repack.cpp), per feature set:
# (flags that must all be present) -> {ggml type name: rows must be a multiple of}.
REPACK_RULES: tuple[tuple[tuple[str, ...], dict[str, int]], ...] = (
    (("avx2",), {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}),
    (("avx512f",), {"Q2_K": 8}),
    (("asimd", "i8mm"), {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 4}),
    (("asimd", "asimddp"), {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 4, "IQ4_NL": 4, "MXFP4": 4}),
)
CRASH_SIGNALS: dict[int, str] = {signal.SIGILL: "SIGILL", signal.SIGSEGV: "SIGSEGV", signal.SIGBUS: "SIGBUS",
                 signal.SIGABRT: "SIGABRT", signal.SIGFPE: "SIGFPE"}
UNSAFE_HINT = ("unsafe build: this CPU advertises instructions (AMX/AVX-512) the machine or VM does "
               "not allow; rebuild with scripts/setup.sh")


@dataclass(frozen=True)
class CpuInfo:
    machine: str                  # "x86_64", "aarch64", ...
    model_name: str
    flags: frozenset[str]

    def to_dict(self) -> dict:
        return {"machine": self.machine, "model_name": self.model_name,
                "features": sorted(f for f in INTERESTING_FLAGS if f in self.flags)}


def read_cpu_info(cpuinfo: Path = CPUINFO, machine: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo: "flags" on x86-64, "Features" on aarch64 (first processor only)."""
    flags: set[str] = set()
    name = ""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "hardware", "cpu model") and not name:
            name = value.strip()
    return CpuInfo(machine or platform.machine(), name or platform.processor() or "unknown", frozenset(flags))


def repacked_types(flags: frozenset[str] | set[str]) -> dict[str, int]:
    """ggml type name -> row multiple, for the types the CPU backend repacks given these flags."""
    out: dict[str, int] = {}
    for needed, types in REPACK_RULES:
        if all(f in flags for f in needed):
            for type_name, multiple in types.items():
                out.setdefault(type_name, multiple)
    return out


@functools.cache  # the CPU does not change while we run; start-up asks several times
def repacked_types_for_this_cpu() -> dict[str, int]:
    return repacked_types(read_cpu_info().flags)


def parse_system_info(text: str) -> dict[str, str]:
    """``"CPU : AVX = 1 | AVX2 = 1 | ..."`` -> {"AVX": "1", "AVX2": "1", ...}."""
    features: dict[str, str] = {}
    for part in text.replace("\n", "|").split("|"):
        name, sep, value = part.rpartition("=")
        if sep:
            features[name.split(":")[-1].strip()] = value.strip()
    return features


def build_features_missing_on_cpu(system_info: dict[str, str], cpu: CpuInfo) -> list[str]:
    """Features the build uses that this CPU does not list: each one means a likely SIGILL."""
    missing = []
    for name, value in system_info.items():
        flag = BUILD_FEATURE_FLAGS.get(name)
        if value == "1" and flag and cpu.flags and flag not in cpu.flags:
            if cpu.machine in ("x86_64", "amd64") and flag in ("asimd", "asimddp", "i8mm", "sve", "sve2", "asimdhp"):
                continue
            missing.append(name)
    return missing


# --- the probe --------------------------------------------------------------------------------------

# Runs in a child: print the build's features, then (given a model) load it and decode a few tokens.
PROBE_CODE = r"""
import sys, llama_cpp
print("SYSTEM_INFO:" + llama_cpp.llama_print_system_info().decode(errors="replace").replace("\n", " "), flush=True)
if len(sys.argv) > 1:
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
    if not model:
        sys.exit("probe: llama.cpp could not load " + sys.argv[1])
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 256, 64, 64
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("probe: llama.cpp could not create a context")
    for n in (16, 1):  # a batch (prompt path) and a single token (decode path)
        tokens = (llama_cpp.llama_token * n)(*range(100, 100 + n))  # kept alive while the batch points to it
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n))
        if rc != 0:
            sys.exit("probe: llama_decode failed (%d)" % rc)
    print("DECODE_OK", flush=True)
"""


@dataclass
class ProbeResult:
    safe: bool | None             # None: could not tell (the probe failed for another reason)
    decoded: bool                 # a model was loaded and decoded
    message: str
    system_info: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def probe_command(model: Path | None, python: str = sys.executable) -> list[str]:
    return [python, "-c", PROBE_CODE] + ([str(model)] if model else [])


def run_probe(cmd: list[str], timeout_s: float = 120.0) -> ProbeResult:
    """Run a probe command and judge the build by how the child ended (never crashes the caller)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(None, False, f"probe did not finish within {timeout_s:.0f} s")
    except OSError as exc:
        return ProbeResult(None, False, f"probe could not start: {exc}")
    info_line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SYSTEM_INFO:")), "")
    system_info = parse_system_info(info_line.removeprefix("SYSTEM_INFO:"))
    decoded = "DECODE_OK" in proc.stdout
    rc = proc.returncode
    if rc < 0:
        name = CRASH_SIGNALS.get(-rc, f"signal {-rc}")
        stage = "while decoding" if info_line else "while loading llama.cpp"
        return ProbeResult(False, False, f"{UNSAFE_HINT} (probe died with {name} {stage})", system_info, rc)
    if rc != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return ProbeResult(None, False, f"probe failed (exit code {rc}): {tail}", system_info, rc)
    if decoded:
        return ProbeResult(True, True, "llama.cpp build loads and decodes on this CPU", system_info, rc)
    return ProbeResult(True, False, "llama.cpp loads on this CPU (no model at hand: decode not tried)",
                       system_info, rc)
