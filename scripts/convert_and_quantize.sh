#!/usr/bin/env bash
# Fetch (or read) a Qwen2-family HF checkpoint and write F32, Q8_0 and Q4_K_M GGUF files.
# A thin wrapper over `qwen-edge convert`; every option is passed through, e.g.
#   scripts/convert_and_quantize.sh                   # default pinned model -> configured model.dir
#   scripts/convert_and_quantize.sh --from-dir ./hf-folder --out models/ --types f32,q8_0
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$here/.venv/bin/qwen-edge" ]; then
  exec "$here/.venv/bin/qwen-edge" convert "$@"
fi
exec qwen-edge convert "$@"
