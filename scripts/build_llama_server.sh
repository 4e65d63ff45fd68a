#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the llama-cpp-python
# source distribution the daemon uses, with the CPU flags scripts/setup.sh derives for this machine.
# It is the peer of `qwen-edge bench http --peer-server`: same llama.cpp, same instruction sets,
# so a side-by-side figure compares the serving code, not two builds.
#
# The binary is cached in ~/.cache/qwen-edge/llama-server/<key>/llama-server, keyed like setup.sh's
# wheel cache (version, arch, CMake flags), so a re-run prints the path in a second. A binary built
# for one CPU dies with SIGILL on another: the key changes with the flags, and the binary is run
# once before it is cached.
#
# Usage: scripts/build_llama_server.sh        (the binary's path is the last line of stdout)
# Environment: LLAMA_CPP_PYTHON_VERSION (0.3.36), CMAKE_ARGS (override the CPU flags), PYTHON.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
LLAMA_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
py=${PYTHON:-$(command -v python3 || command -v python)}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/qwen-edge"

# The flags must be setup.sh's own, not a copy that drifts: take its function definition verbatim.
eval "$(sed -n '/^cmake_args_for_this_cpu() {$/,/^}$/p' "$here/scripts/setup.sh")"
if ! declare -F cmake_args_for_this_cpu >/dev/null; then
  echo "build_llama_server: cmake_args_for_this_cpu not found in scripts/setup.sh" >&2; exit 1
fi
CMAKE_ARGS=${CMAKE_ARGS:-$(cmake_args_for_this_cpu)}

key=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$(uname -m)" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
out="$cache/llama-server/$key"
if [ -x "$out/llama-server" ]; then
  echo "$out/llama-server"; exit 0
fi

sdists="$cache/sdist"
sdist="$sdists/llama_cpp_python-$LLAMA_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "build_llama_server: downloading the llama-cpp-python $LLAMA_VERSION source distribution" >&2
  mkdir -p "$sdists"
  "$py" -m pip download --quiet --no-binary :all: --no-deps -d "$sdists" "llama-cpp-python==$LLAMA_VERSION" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "build_llama_server: no vendored llama.cpp in $sdist" >&2; exit 1; }

echo "build_llama_server: building llama-server for $(uname -m) (several minutes)" >&2
echo "build_llama_server: CMAKE_ARGS=$CMAKE_ARGS" >&2
# Static libraries: the binary lives alone in the cache folder. No OpenSSL, no web UI download
# (offline machines; the benchmark needs neither). LLAMA_CURL is deprecated in this llama.cpp.
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of -D flags
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $CMAKE_ARGS >&2
cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2

bin="$work/build/bin/llama-server"
"$bin" --version >&2 || { echo "build_llama_server: the built binary does not run on this CPU" >&2; exit 1; }
tmp="$out.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
cp "$bin" "$tmp/llama-server"
printf '%s\n' "llama-cpp-python $LLAMA_VERSION" "CMAKE_ARGS=$CMAKE_ARGS" > "$tmp/BUILD_INFO"
rm -rf "$out"; mv "$tmp" "$out"   # only a complete build gets the final name
echo "$out/llama-server"
