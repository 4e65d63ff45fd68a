"""A real Home Assistant, driven over its own REST and websocket APIs, against an Ollama server on loopback.

Two halves in one file:

* The pytest side (any Python, stdlib only): `ha_venv()` and `namespace_problem()` say whether the harness can
  run here; `run_driver(spec, workdir)` runs the driver and returns its JSON results.
* The driver (`python tests/home_assistant.py drive SPEC OUT`, run with the Home Assistant venv's Python from
  scripts/ha_env.sh, under `unshare -n`): brings loopback up in the fresh network namespace, starts the backend
  (the daemon, or `FakeOllama` below), writes HA's configuration for the spec's home, starts `hass --skip-pip`,
  onboards a user, gets a long-lived token, runs the Ollama config flow and options flow, gives entities their
  areas and exposes them to Assist, then runs the spec's steps and writes the results. Every wait is bounded;
  every child is killed at the end, whatever happens (and `run_driver` kills the whole process group).

By hand (see the bottom of this file): `python tests/home_assistant.py record` rewrites the recorded requests in
tests/data/home_assistant/, `python tests/home_assistant.py homes` the recorded part of tests/data/tools_eval/homes/.

A spec: {"home": {...}, "daemon": [command] | "fake": {"tool_calls": {text: calls}, "reply": text}, "options":
{...}, "steps": [{"do": "converse" | "state" | "service" | "script" | "options" | "sleep", "name": ..., ...}]}.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HA_VENV_ENV = "QWEN_EDGE_HA_VENV"
MODEL = "qwen-edge:latest"
CLIENT_ID = "http://127.0.0.1/"  # IndieAuth client id of the onboarding user's token
LOG_TAIL = 6000  # characters of HA's log attached to a failure

# -- the pytest side ----------------------------------------------------------------------------------------------


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
    cmd = ["unshare", "-n", str(venv / "bin" / "python"), str(Path(__file__).resolve()), "drive", str(spec_path),
           str(out)]
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
    results["driver_log"] = _tail(workdir / "driver.log")
    results.setdefault("ha_log", _tail(workdir / "ha" / "home-assistant.log"))
    return results


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG), so a killed test or
    driver leaves no Home Assistant or daemon behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    """The end of a log, without HA's per-token "Received delta" lines (its "Received response" lines remain)."""
    try:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        return ""
    return "".join(line for line in lines if "] Received delta: " not in line)[-n:]


def explain(results: dict) -> str:
    """What to show when an assertion on the results fails: the error, then the logs."""
    parts = [f"driver error: {results['error']}"] if results.get("error") else []
    parts += [f"--- Home Assistant log (tail) ---\n{results.get('ha_log', '')}",
              f"--- driver log (tail) ---\n{results.get('driver_log', '')}"]
    if results.get("daemon_log"):
        parts.append(f"--- daemon log (tail) ---\n{results['daemon_log']}")
    return "\n".join(parts)


# -- HA's configuration for a home --------------------------------------------------------------------------------
# A home: {"name", "language", "areas": [...], "entities": [{"kind", "id", "name", "area"?, "aliases"?, ...}]}.
# Kinds: input_boolean; light (a template light with brightness, kept in hidden helpers); switch; sensor (a
# fixed state with unit); cover (a template cover with position). Only the listed entities are exposed.

SENTIMENT_RECIPE = """\
# Sentiment from Home Assistant: a rest_command asks qwen-edge, a script stores and returns the label.
rest_command:
  qwen_edge_sentiment:
    url: "http://127.0.0.1:11434/v1/sentiment"
    method: POST
    content_type: "application/json"
    payload: '{{ {"text": text} | tojson }}'
    timeout: 60

input_text:
  last_sentiment:
    name: Last sentiment
    max: 32

script:
  sentiment_of_text:
    alias: Sentiment of a text
    description: Asks qwen-edge for the sentiment of a text, stores the label in input_text.last_sentiment
    fields:
      text:
        description: The text to classify
        example: I love this!
        required: true
    sequence:
      - action: rest_command.qwen_edge_sentiment
        data:
          text: "{{ text }}"
        response_variable: sentiment
      - if: "{{ sentiment.status != 200 }}"
        then:
          - stop: The sentiment service failed
            error: true
      - action: input_text.set_value
        target:
          entity_id: input_text.last_sentiment
        data:
          value: "{{ sentiment.content.label }}"
      - variables:
          result:
            label: "{{ sentiment.content.label }}"
            probability: "{{ sentiment.content.probability }}"
      - stop: Done
        response_variable: result
"""
RECIPE_URL = "http://127.0.0.1:11434"  # the daemon's default address; the test substitutes its own


def ha_configuration(home: dict, port: int, daemon_url: str | None) -> str:
    """configuration.yaml for the home (no default_config: only what the tests use loads)."""
    booleans, numbers, templates, covers = {}, {}, [], {}
    for e in home["entities"]:
        kind, oid, name = e["kind"], e["id"], e["name"]
        if kind == "input_boolean":
            booleans[oid] = {"name": name}
        elif kind in ("light", "switch"):
            booleans[f"{oid}_power"] = {"name": f"{oid} power"}
            on = [{"action": "input_boolean.turn_on", "target": {"entity_id": f"input_boolean.{oid}_power"}}]
            off = [{"action": "input_boolean.turn_off", "target": {"entity_id": f"input_boolean.{oid}_power"}}]
            item = {"name": name, "unique_id": oid, "state": f"{{{{ is_state('input_boolean.{oid}_power', 'on') }}}}",
                    "turn_on": on, "turn_off": off}
            if kind == "light":
                numbers[f"{oid}_level"] = {"name": f"{oid} level", "min": 0, "max": 255, "initial": 128}
                item["level"] = f"{{{{ states('input_number.{oid}_level') | int }}}}"
                item["set_level"] = [
                    {"action": "input_number.set_value", "target": {"entity_id": f"input_number.{oid}_level"},
                     "data": {"value": "{{ brightness }}"}}, *on]
            templates.append({kind: [item]})
        elif kind == "sensor":
            item = {"name": name, "unique_id": oid, "state": str(e["state"])}
            item.update({k: e[src] for k, src in (("unit_of_measurement", "unit"), ("device_class", "device_class"))
                         if e.get(src)})
            templates.append({"sensor": [item]})
        elif kind == "cover":
            numbers[f"{oid}_position"] = {"name": f"{oid} position", "min": 0, "max": 100, "initial": 0}
            pos = f"input_number.{oid}_position"
            covers[oid] = {"friendly_name": name, "unique_id": oid, "device_class": e.get("device_class", "garage"),
                           "position_template": f"{{{{ states('{pos}') | int }}}}",
                           "open_cover": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                           "data": {"value": 100}}],
                           "close_cover": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                            "data": {"value": 0}}],
                           "set_cover_position": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                                   "data": {"value": "{{ position }}"}}]}
        else:
            raise ValueError(f"unknown entity kind {kind!r}")
    config = {
        "homeassistant": {"name": home.get("name", "Test home"), "latitude": 52.37, "longitude": 4.89,
                          "elevation": 0, "unit_system": "metric", "time_zone": "UTC", "country": "NL",
                          "currency": "EUR", "language": home.get("language", "en")},
        "http": {"server_host": "127.0.0.1", "server_port": port},
        "logger": {"default": "warning", "logs": {"homeassistant.components.ollama": "debug",
                                                   "homeassistant.components.conversation": "debug"}},
        "conversation": {},
    }
    if booleans:
        config["input_boolean"] = booleans
    if numbers:
        config["input_number"] = numbers
    if templates:
        config["template"] = templates
    if covers:
        config["cover"] = [{"platform": "template", "covers": covers}]
    import yaml  # the HA venv has it; the driver is the only caller

    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    if daemon_url:
        text += "\n" + SENTIMENT_RECIPE.replace(RECIPE_URL, daemon_url)
    return text


# -- the driver (HA venv, inside the namespace) --------------------------------------------------------------------


class Deadline(Exception):
    """A bounded wait ran out."""


async def wait_for(what: str, probe, timeout: float, interval: float = 0.5, alive=None):
    """Poll `probe()` until it returns something truthy; `alive()` returning a message aborts early."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if alive is not None and (dead := alive()):
            raise Deadline(f"{what}: {dead}")
        try:
            if result := await probe():
                return result
        except Exception as exc:  # noqa: BLE001 - not up yet; keep the last reason for the message
            last = exc
        await asyncio.sleep(interval)
    raise Deadline(f"{what}: not within {timeout:.0f} s (last error: {last!r})")


class FakeOllama:
    """A tiny Ollama server that records every request in order. `/api/chat` answers with a tool call when the
    request has tools, its last message is the user's and that text is a key of `tool_calls`; otherwise with
    a text (`reply`). Streams NDJSON when asked to, as Ollama does. `/v1/sentiment` always says positive."""

    def __init__(self, tool_calls: dict[str, list[dict]] | None = None, reply: str = "Done.") -> None:
        self.tool_calls = {k.strip().lower(): v for k, v in (tool_calls or {}).items()}
        self.reply = reply
        self.requests: list[dict] = []
        self.phase = "setup"  # the driver names the step each request belongs to
        self.runner = None

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, port: int) -> str:
        from aiohttp import web

        self.runner = web.AppRunner(self.app())
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request):
        from aiohttp import web

        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self.requests.append({"phase": self.phase, "method": request.method, "path": request.path, "body": body})
        tag = {"name": MODEL, "model": MODEL, "modified_at": "2025-01-01T00:00:00Z", "size": 1, "digest": "0" * 64,
               "details": {"format": "gguf", "family": "qwen2", "parameter_size": "0.5B",
                           "quantization_level": "Q4_K_M"}}
        if request.path == "/api/tags":
            return web.json_response({"models": [tag]})
        if request.path == "/api/version":
            return web.json_response({"version": "0.6.0"})
        if request.path == "/api/show":
            return web.json_response({"details": tag["details"], "capabilities": ["completion", "tools"],
                                      "model_info": {"general.architecture": "qwen2"}})
        if request.path == "/v1/sentiment":  # the daemon's native API, for the sentiment recipe
            return web.json_response({"label": "positive", "display": "Positive", "probability": 0.9,
                                      "language": "en", "n_tokens": 3, "truncated": False, "latency_ms": 1})
        if request.path == "/api/chat" and isinstance(body, dict):
            return await self.chat(request, body)
        return web.json_response({"error": f"fake server: no {request.method} {request.path}"}, status=404)

    def answer(self, body: dict) -> dict:
        messages = body.get("messages") or [{}]
        last = messages[-1]
        calls = None
        if body.get("tools") and last.get("role") == "user":
            calls = self.tool_calls.get(str(last.get("content", "")).strip().lower())
        if calls:
            return {"role": "assistant", "content": "", "tool_calls": calls}
        return {"role": "assistant", "content": self.reply}

    async def chat(self, request, body: dict):
        from aiohttp import web

        message = self.answer(body)
        head = {"model": body.get("model", MODEL), "created_at": "2025-01-01T00:00:00Z"}
        final = {**head, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                 "total_duration": 1, "prompt_eval_count": 1, "eval_count": 1}
        if not body.get("stream", True):
            return web.json_response({**final, "message": message})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write((json.dumps({**head, "message": message, "done": False}) + "\n").encode())
        await resp.write((json.dumps(final) + "\n").encode())
        await resp.write_eof()
        return resp


class HA:
    """One running Home Assistant: REST with a bearer token, websocket commands."""

    def __init__(self, session, base: str) -> None:
        self.session, self.base = session, base
        self.token: str | None = None
        self.ws = None
        self.ws_id = 0

    async def rest(self, method: str, path: str, json_body=None, timeout: float = 30, ok=(200, 201)):
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, self.base + path, json=json_body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status not in ok:
                raise RuntimeError(f"{method} {path} -> {resp.status}: {text[:500]}")
            return json.loads(text) if text else None

    async def onboard(self, language: str) -> None:
        """Onboarding's user step, the code flow for a token, then a long-lived token over the websocket."""
        import aiohttp

        user = {"client_id": CLIENT_ID, "name": "Test User", "username": "test", "password": "test-password-1",
                "language": language}
        code = (await self.rest("POST", "/api/onboarding/users", user))["auth_code"]
        async with self.session.post(self.base + "/auth/token", data={
                "grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID},
                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200, f"/auth/token -> {resp.status}: {await resp.text()}"
            self.token = (await resp.json())["access_token"]
        await self.connect_ws()
        self.token = await self.command("auth/long_lived_access_token", client_name="qwen-edge tests", lifespan=1)
        await self.ws.close()
        await self.connect_ws()

    async def connect_ws(self) -> None:
        import aiohttp

        self.ws = await self.session.ws_connect(self.base.replace("http", "ws") + "/api/websocket",
                                                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10))
        assert (await self.ws.receive_json(timeout=30))["type"] == "auth_required"
        await self.ws.send_json({"type": "auth", "access_token": self.token})
        reply = await self.ws.receive_json(timeout=30)
        assert reply["type"] == "auth_ok", f"websocket auth: {reply}"

    async def command(self, type_: str, timeout: float = 30, **fields):
        self.ws_id += 1
        await self.ws.send_json({"id": self.ws_id, "type": type_, **fields})
        end = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive_json(timeout=max(0.1, end - time.monotonic()))
            if msg.get("id") == self.ws_id and msg.get("type") == "result":
                if not msg.get("success"):
                    raise RuntimeError(f"websocket {type_} failed: {msg.get('error')}")
                return msg.get("result")

    async def entry(self, domain: str) -> dict | None:
        entries = await self.command("config_entries/get", domain=domain)
        return entries[0] if entries else None

    async def wait_loaded(self, domain: str, timeout: float = 60) -> dict:
        async def loaded():
            entry = await self.entry(domain)
            if entry and entry["state"] in ("setup_error", "setup_retry", "failed_unload"):
                raise RuntimeError(f"{domain} entry state {entry['state']}: {entry.get('reason')}")
            return entry if entry and entry["state"] == "loaded" else None
        return await wait_for(f"{domain} config entry loaded", loaded, timeout)


async def start_process(cmd: list[str], log: Path, procs: list, env: dict | None = None):
    handle = open(log, "wb")
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=handle, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                                preexec_fn=die_with_parent)
    procs.append((proc, handle))
    return proc


async def stop_processes(procs: list) -> None:
    for proc, _ in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc, handle in procs:
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        handle.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_up() -> None:
    """In a fresh network namespace: loopback up, with multicast (HA's zeroconf needs a multicast route)."""
    for args in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                 ["route", "add", "224.0.0.0/4", "dev", "lo"]):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


async def start_backend(spec: dict, workdir: Path, procs: list, session) -> tuple[str, FakeOllama | None, Path | None]:
    """The Ollama server HA talks to: the daemon (`spec["daemon"]`, a command without --port) or a FakeOllama."""
    port = free_port()
    if spec.get("daemon"):
        log = workdir / "daemon.log"
        proc = await start_process([*spec["daemon"], "--port", str(port)], log, procs, spec.get("daemon_env"))
        url = f"http://127.0.0.1:{port}"

        async def ready():
            async with session.get(url + "/health") as resp:
                return resp.status == 200 and "ready" in await resp.text()
        await wait_for("daemon /health ready", ready, spec.get("daemon_start_s", 240), 1.0,
                       alive=lambda: proc.returncode is not None and f"daemon exited {proc.returncode}")
        return url, None, log
    fake = FakeOllama(spec.get("fake", {}).get("tool_calls"), spec.get("fake", {}).get("reply", "Done."))
    return await fake.start(port), fake, None


async def start_ha(spec: dict, workdir: Path, backend_url: str, procs: list, session) -> HA:
    venv_bin = Path(sys.executable).parent
    config_dir = workdir / "ha"
    config_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (config_dir / "configuration.yaml").write_text(ha_configuration(spec["home"], port, backend_url))
    proc = await start_process([str(venv_bin / "hass"), "--skip-pip", "-c", str(config_dir)],
                               workdir / "hass.out", procs)
    ha = HA(session, f"http://127.0.0.1:{port}")

    async def up():
        async with session.get(ha.base + "/api/onboarding") as resp:
            return resp.status == 200
    await wait_for("Home Assistant HTTP up", up, spec.get("ha_start_s", 180),
                   alive=lambda: proc.returncode is not None and f"hass exited {proc.returncode}")
    await ha.onboard(spec["home"].get("language", "en"))
    await wait_for("Home Assistant RUNNING",
                   lambda: _running(ha), spec.get("ha_start_s", 180))
    return ha


async def _running(ha: HA) -> bool:
    return (await ha.rest("GET", "/api/config"))["state"] == "RUNNING"


async def place_and_expose(ha: HA, home: dict) -> dict:
    """Areas (reusing those onboarding made), each entity's area and aliases, Assist exposure of exactly these."""
    areas = {a["name"].casefold(): a["area_id"] for a in await ha.command("config/area_registry/list")}
    for name in home.get("areas", []):
        if name.casefold() not in areas:
            areas[name.casefold()] = (await ha.command("config/area_registry/create", name=name))["area_id"]
    ids = await registered_ids(ha, home)
    for e in home["entities"]:
        update = {"aliases": e.get("aliases", [])}
        if e.get("area"):
            update["area_id"] = areas[e["area"].casefold()]
        await ha.command("config/entity_registry/update", entity_id=ids[e["id"]], **update)
    await ha.command("homeassistant/expose_new_entities/set", assistant="conversation", expose_new=False)
    await ha.command("homeassistant/expose_entity", assistants=["conversation"], entity_ids=list(ids.values()),
                     should_expose=True)
    listed = (await ha.command("homeassistant/expose_entity/list"))["exposed_entities"]
    return {"entity_ids": ids, "exposed": sorted(k for k, v in listed.items() if v.get("conversation"))}


async def registered_ids(ha: HA, home: dict) -> dict[str, str]:
    """Each home entity's entity_id, found in the entity registry by its unique id (a template entity's
    entity_id comes from its name, which may be Chinese)."""
    wanted = {e["id"] for e in home["entities"]}

    async def lookup():
        found = {}
        for entry in await ha.command("config/entity_registry/list"):
            uid = str(entry.get("unique_id", ""))
            if entry["platform"] in ("input_boolean", "template"):
                for oid in wanted:
                    if uid == oid or uid.endswith("-" + oid):
                        found[oid] = entry["entity_id"]
        return found if set(found) == wanted else None
    return await wait_for(f"entities {sorted(wanted)} registered", lookup, 60)


async def ollama_flow(ha: HA, url: str, model: str) -> dict:
    """The Ollama integration's config flow over REST: URL, then the model picked from the offered list."""
    flow = await ha.rest("POST", "/api/config/config_entries/flow", {"handler": "ollama"})
    assert flow["type"] == "form" and flow["step_id"] == "user", flow
    step = await ha.rest("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {"url": url})
    assert step["type"] == "form", f"after the URL: {step}"
    offered = [o["value"] for f in step["data_schema"] if f["name"] == "model"
               for o in f["selector"]["select"]["options"]]
    done = await ha.rest("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {"model": model},
                         timeout=60)
    return {"offered_models": offered, "result_type": done["type"], "reason": done.get("reason"),
            "entry_title": done.get("title")}


async def ollama_options(ha: HA, options: dict) -> dict:
    """The options flow (prompt, llm_hass_api, num_ctx, max_history, keep_alive); HA reloads the entry."""
    entry = await ha.entry("ollama")
    flow = await ha.rest("POST", "/api/config/config_entries/options/flow", {"handler": entry["entry_id"]})
    done = await ha.rest("POST", f"/api/config/config_entries/options/flow/{flow['flow_id']}", options)
    assert done["type"] == "create_entry", done
    await asyncio.sleep(1)  # the update listener schedules the reload
    await ha.wait_loaded("ollama")
    return options


async def agent_id(ha: HA) -> str:
    async def find():
        states = await ha.rest("GET", "/api/states")
        return next((s["entity_id"] for s in states if s["entity_id"].startswith("conversation.")
                     and s["entity_id"] != "conversation.home_assistant"), None)
    return await wait_for("Ollama conversation entity", find, 30)


async def run_step(ha: HA, step: dict, ctx: dict, fake: FakeOllama | None) -> dict:
    """One step of the spec; returns what the test asserts on."""
    kind = step["do"]
    seen = len(fake.requests) if fake else 0
    if fake:
        fake.phase = step.get("name", kind)
    t0 = time.monotonic()
    out: dict = {"do": kind, "name": step.get("name", kind)}
    if kind == "converse":
        body = {"text": step["text"], "language": step.get("language", "en"), "agent_id": ctx["agent_id"]}
        if conv := ctx["conversations"].get(step.get("conversation")):
            body["conversation_id"] = conv
        reply = await ha.rest("POST", "/api/conversation/process", body, timeout=step.get("timeout", 300))
        ctx["conversations"][step.get("conversation")] = reply.get("conversation_id")
        resp = reply.get("response", {})
        out.update(speech=resp.get("speech", {}).get("plain", {}).get("speech"),
                   response_type=resp.get("response_type"), data=resp.get("data"),
                   conversation_id=reply.get("conversation_id"))
    elif kind == "state":
        out["state"] = (await ha.rest("GET", f"/api/states/{step['entity_id']}"))["state"]
    elif kind == "service":
        await ha.rest("POST", f"/api/services/{step['domain']}/{step['service']}", step.get("data", {}))
    elif kind == "script":
        reply = await ha.rest("POST", f"/api/services/script/{step['script']}?return_response",
                              step.get("data", {}), timeout=step.get("timeout", 120))
        out["response"] = reply.get("service_response")
    elif kind == "options":
        out["options"] = await ollama_options(ha, step["options"])
        ctx["agent_id"] = await agent_id(ha)
    elif kind == "sleep":
        await asyncio.sleep(step["seconds"])
    else:
        raise ValueError(f"unknown step {kind!r}")
    out["seconds"] = round(time.monotonic() - t0, 2)
    if fake:
        out["requests"] = fake.requests[seen:]
    return out


async def drive(spec: dict) -> dict:
    import aiohttp

    workdir = Path(spec["workdir"])
    results: dict = {"setup": {}, "steps": []}
    procs: list = []
    fake = daemon_log = None
    try:
        loopback_up()
        async with aiohttp.ClientSession() as session:
            t0 = time.monotonic()
            url, fake, daemon_log = await start_backend(spec, workdir, procs, session)
            results["setup"]["backend_s"] = round(time.monotonic() - t0, 1)
            ha = await start_ha(spec, workdir, url, procs, session)
            results["setup"]["ha_start_s"] = round(time.monotonic() - t0, 1)
            results["setup"]["ha_version"] = (await ha.rest("GET", "/api/config"))["version"]
            results["setup"].update(await place_and_expose(ha, spec["home"]))
            results["setup"]["flow"] = flow = await ollama_flow(ha, url, spec.get("model", MODEL))
            if flow["result_type"] != "create_entry":
                raise RuntimeError(f"Ollama config flow did not create an entry: {flow}")
            results["setup"]["entry_state"] = (await ha.wait_loaded("ollama"))["state"]
            if spec.get("options"):
                results["setup"]["options"] = await ollama_options(ha, spec["options"])
            ctx = {"agent_id": await agent_id(ha), "conversations": {}}
            results["setup"]["agent_id"] = ctx["agent_id"]
            results["setup"]["seconds"] = round(time.monotonic() - t0, 1)
            for step in spec.get("steps", []):
                results["steps"].append(await run_step(ha, step, ctx, fake))
            if ha.ws is not None:
                await ha.ws.close()
    except Exception as exc:  # noqa: BLE001 - reported to the test with the logs
        import traceback

        results["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    finally:
        await stop_processes(procs)
        if fake is not None:
            results["requests"] = fake.requests
            await fake.stop()
        results["ha_log"] = _tail(workdir / "ha" / "home-assistant.log")
        if daemon_log is not None:
            results["daemon_log"] = _tail(daemon_log, 3000)
    return results


def driver_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    results = asyncio.run(drive(spec))
    Path(out_path).write_text(json.dumps(results, ensure_ascii=False, indent=1))
    return 1 if results.get("error") else 0


# -- recordings (run by hand; see tests/data/home_assistant/README.md) ----------------------------------------------

DATA = ROOT / "tests" / "data"
HOMES_DIR = DATA / "tools_eval" / "homes"
ASSIST_OPTIONS = {"llm_hass_api": "assist", "num_ctx": 8192, "max_history": 20, "keep_alive": -1}  # HA's defaults
KITCHEN_ON = [{"function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen light"}}}]
LIVE_CONTEXT = [{"function": {"name": "GetLiveContext", "arguments": {}}}]


def load_home(home_id: str) -> dict:
    """The home (areas, entities) of tests/data/tools_eval/homes/<id>.json."""
    return json.loads((HOMES_DIR / f"{home_id}.json").read_text())["home"]


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
            "daemon_api_chat": [line.split('"POST /api/chat"')[1].strip() for line in log if '"POST /api/chat"' in line]}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "drive":
        return driver_main(argv[1], argv[2])
    if len(argv) == 2 and argv[0] == "time":
        import tempfile

        venv, why = ha_venv()
        if venv is None:
            raise SystemExit(why)
        with tempfile.TemporaryDirectory(prefix="ha_time_") as tmp:
            print(json.dumps(time_turn_on(Path(argv[1]).resolve(), Path(tmp), venv), ensure_ascii=False, indent=1))
        return 0
    if argv and argv[0] in ("record", "homes"):
        import tempfile

        venv, why = ha_venv()
        if venv is None:
            raise SystemExit(why)
        with tempfile.TemporaryDirectory(prefix="ha_record_") as tmp:
            if argv[0] == "record":
                record_requests(Path(argv[1]) if len(argv) > 1 else DATA / "home_assistant", venv, Path(tmp))
            else:
                record_homes(venv, Path(tmp))
        return 0
    raise SystemExit(f"usage: {sys.argv[0]} drive SPEC OUT | record [OUT_DIR] | homes | time MODEL.gguf")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
