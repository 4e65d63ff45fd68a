#!/usr/bin/env bash
# Set up .venv with a llama-cpp-python that is safe on this CPU, then install qwen-edge.
#
# Why not `pip install llama-cpp-python`: the source build defaults to GGML_NATIVE=ON, which on
# x86-64 turns on every instruction set the CPU *advertises*. Virtual machines often advertise AMX
# without letting it run, and the first decode then dies (SIGSEGV / SIGILL). So on x86-64 we turn
# NATIVE off and enable, one by one, the extensions /proc/cpuinfo lists, never AMX. On aarch64
# (Raspberry Pi, ARM NAS) native flags are safe and fastest.
#
# The built wheel is kept in ~/.cache/qwen-edge/wheels/<key>/, keyed by version, arch and flags,
# so a re-run (or CI on the same machine) installs in seconds.
#
# Usage: scripts/setup.sh [--extra test] [--venv DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --extra) extra="[$2]"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    *) echo "setup.sh: unknown option $1 (use --extra test, --venv DIR)" >&2; exit 2 ;;
  esac
done
LLAMA_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
py=${PYTHON:-$(command -v python3 || command -v python)}

cmake_args_for_this_cpu() {
  case "$(uname -m)" in
    x86_64|amd64)
      local flags; flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
      local args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
      # cpuinfo flag -> ggml CMake option; a table so a new extension is one more row.
      local pair
      for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI \
                  avx_vnni:AVX_VNNI avx512_bf16:AVX512_BF16 avx512vbmi:AVX512_VBMI; do
        case "$flags" in *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;; esac
      done
      echo "$args" ;;
    aarch64|arm64) echo "-DGGML_NATIVE=ON" ;;
    *) echo "-DGGML_NATIVE=OFF" ;;
  esac
}

CMAKE_ARGS=${CMAKE_ARGS:-$(cmake_args_for_this_cpu)}
export CMAKE_ARGS
key=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$(uname -m)" "$("$py" -c 'import sys;print(sys.version_info[:2])')" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/qwen-edge/wheels/$key"

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2

if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $LLAMA_VERSION for $(uname -m) (a few minutes)" >&2
  echo "setup: CMAKE_ARGS=$CMAKE_ARGS" >&2
  tmp="$wheels.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  MAKEFLAGS="-j$(nproc)" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/python" -m pip wheel --no-cache-dir --no-deps -w "$tmp" "llama-cpp-python==$LLAMA_VERSION" >&2
  rm -rf "$wheels"; mv "$tmp" "$wheels"   # only a complete build gets the final name
fi
"$venv/bin/python" -m pip install --quiet "$wheels"/llama_cpp_python-*.whl >&2
"$venv/bin/python" -m pip install --quiet -e "$here$extra" >&2
echo "setup: ready: $venv" >&2
