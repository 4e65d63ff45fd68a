"""scripts/decode_paths.py on the tiny model: every way is timed, and the ratios come from the medians."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_paths_times_the_daemon_the_engine_and_raw_llama_cpp(tiny_gguf: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "decode_paths.py"), str(tiny_gguf),
                          "--rounds", "2", "--max-tokens", "8"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert set(report["rounds_tps"]) == {"daemon", "engine", "raw"}
    assert all(len(v) == 2 and min(v) > 0 for v in report["rounds_tps"].values())
    median = report["median_tps"]
    assert report["ratios"] == {"daemon_vs_engine": round(median["daemon"] / median["engine"], 3),
                                "engine_vs_raw": round(median["engine"] / median["raw"], 3)}
