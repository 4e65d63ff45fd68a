"""Recordings and timings from a real Home Assistant, run by hand (needs the HA venv, scripts/ha_env.sh):

    python tests/ha_recordings.py record [OUT_DIR]  # the requests HA sends: tests/data/home_assistant/
    python tests/ha_recordings.py homes             # HA's prompt, tools, live context: tests/data/tools_eval/homes/
    python tests/ha_recordings.py time MODEL.gguf   # "turn on the kitchen light" against the daemon (BENCHMARKS.md)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ha_driver import FakeOllama
from home_assistant import (
    ASSIST_OPTIONS,
    DATA,
    HOMES_DIR,
    KITCHEN_ON,
    LIVE_CONTEXT,
    daemon_command,
    explain,
    ha_venv,
    load_home,
    run_driver,
)


def record_requests(out_dir: Path, venv: Path, workdir: Path) -> None:
    """Every request HA sends the Ollama server, in order, for the conversations below; /api/chat bodies as
    files, the whole sequence (with what the fake answered) in sequence.json."""
    fake = {"tool_calls": {"turn on the kitchen light": KITCHEN_ON, "把厨房的灯打开": KITCHEN_ON,
                           "is the bedroom light on?": LIVE_CONTEXT}, "reply": "Done."}
    steps = [
        {"do": "converse", "name": "assist_en_turn_on", "text": "Turn on the kitchen light", "conversation": "a"},
        {"do": "sleep", "name": "a_few_seconds_later", "seconds": 3},
        {"do": "converse", "name": "assist_en_second_turn", "text": "Is the bedroom light on?", "conversation": "a"},
        {"do": "converse", "name": "assist_zh_turn_on", "text": "把厨房的灯打开", "language": "zh-Hans",
         "conversation": "b"},
        {"do": "sleep", "name": "a_minute_later", "seconds": 60},
        {"do": "converse", "name": "assist_en_new_conversation_later", "text": "Turn on the kitchen light",
         "conversation": "c"},
        {"do": "options", "name": "assist_off", "options": {**ASSIST_OPTIONS, "llm_hass_api": "none"}},
        {"do": "converse", "name": "no_assist_en", "text": "Hello! Who are you?", "conversation": "d"},
    ]
    spec = {"home": load_home("apartment_en"), "options": ASSIST_OPTIONS, "fake": fake, "steps": steps}
    results = run_driver(spec, workdir, venv, timeout=600)
    if results.get("error"):
        raise SystemExit(explain(results))
    answer = FakeOllama(fake["tool_calls"], fake["reply"]).answer
    out_dir.mkdir(parents=True, exist_ok=True)
    sequence, n, per_phase = [], 0, {}
    for req in results["requests"]:
        item = {"phase": req["phase"], "method": req["method"], "path": req["path"]}
        if req["path"] == "/api/chat":
            n += 1
            k = per_phase[req["phase"]] = per_phase.get(req["phase"], 0) + 1
            item["file"] = f"{n:02d}_{req['phase']}{'' if k == 1 else '_tool_result'}.json"
            item["fake_answered"] = answer(req["body"])
            (out_dir / item["file"]).write_text(json.dumps(req["body"], ensure_ascii=False, indent=2) + "\n")
        elif req["body"] is not None:
            item["body"] = req["body"]
        sequence.append(item)
    meta = {"ha_version": results["setup"]["ha_version"], "options": ASSIST_OPTIONS, "home": spec["home"],
            "steps": steps, "requests": sequence}
    (out_dir / "sequence.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def record_homes(venv: Path, workdir: Path) -> None:
    """For each home in tests/data/tools_eval/homes/: HA's system prompt and tools as HA renders them (Assist
    on), and what GetLiveContext returns there; written back into the home's file under "recorded"."""
    for path in sorted(HOMES_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        zh = doc["home"]["language"].startswith("zh")
        text = "家里现在怎么样？" if zh else "How is the house right now?"
        spec = {"home": doc["home"], "options": ASSIST_OPTIONS, "fake": {"tool_calls": {text: LIVE_CONTEXT}},
                "steps": [{"do": "converse", "name": "live", "text": text, "language": doc["home"]["language"]}]}
        results = run_driver(spec, workdir / doc["id"], venv, timeout=300)
        if results.get("error"):
            raise SystemExit(explain(results))
        first, second = (r["body"] for r in results["steps"][0]["requests"])
        doc["recorded"] = {
            "ha_version": results["setup"]["ha_version"],
            "entity_ids": results["setup"]["entity_ids"],
            "request": {k: v for k, v in first.items() if k not in ("messages", "tools")},
            "system_prompt": first["messages"][0]["content"],
            "tools": first["tools"],
            "live_context": json.loads(second["messages"][-1]["content"]),
        }
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def time_turn_on(model: Path, workdir: Path, venv: Path) -> dict:
    """Home Assistant's own Ollama integration against the daemon on `model`, Assist on: "Turn on the
    kitchen light" in a first conversation (HA's prompt evaluated), then "Turn off the kitchen light"
    in a new one (its stable part reused); each step's seconds as HA's REST API saw them, the state of
    the light after each, and the daemon's access-log lines of /api/chat (prompt and cached tokens)."""
    kitchen = "input_boolean.kitchen_light"
    spec = {"home": load_home("apartment_en"), "daemon": daemon_command(model),
            "daemon_env": {"QWEN_EDGE_CHAT__TEMPERATURE": "0"},
            "steps": [{"do": "options", "name": "assist_on", "options": ASSIST_OPTIONS},
                      {"do": "converse", "name": "turn_on", "text": "Turn on the kitchen light", "conversation": "a"},
                      {"do": "state", "name": "after_turn_on", "entity_id": kitchen},
                      {"do": "converse", "name": "turn_off", "text": "Turn off the kitchen light",
                       "conversation": "b"},
                      {"do": "state", "name": "after_turn_off", "entity_id": kitchen}]}
    results = run_driver(spec, workdir, venv, timeout=900)
    if results.get("error"):
        raise SystemExit(explain(results))
    log = (workdir / "daemon.log").read_text(errors="replace").splitlines()
    return {"ha_version": results["setup"]["ha_version"],
            "steps": {s["name"]: {k: s.get(k) for k in ("seconds", "speech", "state")} for s in results["steps"]},
            "daemon_api_chat": [line.split('"POST /api/chat"')[1].strip()
                                for line in log if '"POST /api/chat"' in line]}


def main(argv: list[str]) -> int:
    def timed(tmp: Path, venv: Path) -> None:
        sys.stdout.write(json.dumps(time_turn_on(Path(argv[1]).resolve(), tmp, venv), ensure_ascii=False, indent=1))

    modes = {"record": lambda tmp, venv: record_requests(Path(argv[1]) if len(argv) > 1 else DATA / "home_assistant",
                                                       venv, tmp),
             "homes": lambda tmp, venv: record_homes(venv, tmp),
             "time": timed}
    if not argv or argv[0] not in modes or (argv[0] == "time" and len(argv) != 2):
        raise SystemExit(f"usage: {sys.argv[0]} record [OUT_DIR] | homes | time MODEL.gguf")
    venv, why = ha_venv()
    if venv is None:
        raise SystemExit(why)
    with tempfile.TemporaryDirectory(prefix=f"ha_{argv[0]}_") as tmp:
        modes[argv[0]](Path(tmp), venv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
