"""A real Home Assistant for the tests, driven over its own REST and websocket APIs against an Ollama server on
loopback: the pytest side (any Python, stdlib only).

`ha_venv()` and `namespace_problem()` say whether the harness can run here; `run_driver(spec, workdir)` runs the
driver (ha_driver.py, with the HA venv's Python, under `unshare -n`) and returns its JSON results, killing its
whole process group at the end; `explain(results)` is what a failing assertion shows. The spec pieces the tests
and the recordings (ha_recordings.py) share are here too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ha_driver import MODEL as MODEL  # re-exported: the model name HA is configured with
from ha_driver import die_with_parent, log_tail

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "ha_driver.py"
HA_VENV_ENV = "QWEN_EDGE_HA_VENV"
DATA = ROOT / "tests" / "data"
HOMES_DIR = DATA / "tools_eval" / "homes"
ASSIST_OPTIONS = {"llm_hass_api": "assist", "num_ctx": 8192, "max_history": 20, "keep_alive": -1}  # HA's defaults
KITCHEN_ON = [{"function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen light"}}}]
LIVE_CONTEXT = [{"function": {"name": "GetLiveContext", "arguments": {}}}]


def load_home(home_id: str) -> dict:
    """The home (areas, entities) of tests/data/tools_eval/homes/<id>.json."""
    return json.loads((HOMES_DIR / f"{home_id}.json").read_text())["home"]


def ha_venv() -> tuple[Path | None, str]:
    """The HA venv (env QWEN_EDGE_HA_VENV, else the cached one scripts/ha_env.sh made), or None and why not."""
    path = os.environ.get(HA_VENV_ENV)
    if not path:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "ha_env.sh"), "--cached"], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            return None, f"{HA_VENV_ENV} not set and no cached venv (run scripts/ha_env.sh): {done.stderr.strip()}"
        path = done.stdout.strip().splitlines()[-1]
    python = Path(path) / "bin" / "python"
    if not python.is_file():
        return None, f"{HA_VENV_ENV}={path} has no bin/python"
    return Path(path), ""


def namespace_problem() -> str:
    """Empty when `unshare -n` and `ip` work here, else why not."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    try:
        done = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -n` failed: {exc}"
    return "" if done.returncode == 0 else f"`unshare -n` failed: {done.stderr.strip()}"


def daemon_command(gguf: Path, extra_args: list[str] | None = None) -> list[str]:
    """`qwen-edge serve` of the current (project) venv; the driver appends `--port`."""
    exe = Path(sys.executable).parent / "qwen-edge"
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge.cli"]
    return [*head, "serve", "--model", str(gguf), *(extra_args or [])]


def run_driver(spec: dict, workdir: Path, venv: Path, timeout: float) -> dict:
    """Run the driver under `unshare -n`; its results, with HA's and the driver's log tails added."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out = workdir / "spec.json", workdir / "results.json"
    spec_path.write_text(json.dumps({**spec, "workdir": str(workdir)}, ensure_ascii=False, indent=1))
    out.unlink(missing_ok=True)
    cmd = ["unshare", "-n", str(venv / "bin" / "python"), str(DRIVER), str(spec_path), str(out)]
    env = {**os.environ, "PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1"}
    with open(workdir / "driver.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the driver's children share its process group: none survives
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(0.5 if sig == signal.SIGTERM else 0)
            proc.wait(timeout=30)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if timed_out:
        results["error"] = f"driver killed after {timeout:.0f} s. " + results.get("error", "")
    elif not out.is_file():
        results["error"] = f"driver exited {proc.returncode} without results"
    results["driver_log"] = log_tail(workdir / "driver.log")
    results.setdefault("ha_log", log_tail(workdir / "ha" / "home-assistant.log"))
    return results


def explain(results: dict) -> str:
    """What to show when an assertion on the results fails: the error, then the logs."""
    parts = [f"driver error: {results['error']}"] if results.get("error") else []
    parts += [f"--- Home Assistant log (tail) ---\n{results.get('ha_log', '')}",
              f"--- driver log (tail) ---\n{results.get('driver_log', '')}"]
    if results.get("daemon_log"):
        parts.append(f"--- daemon log (tail) ---\n{results['daemon_log']}")
    return "\n".join(parts)
