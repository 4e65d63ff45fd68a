"""The driver of the Home Assistant tests: `python tests/ha_driver.py SPEC OUT`, run with the Home Assistant
venv's Python from scripts/ha_env.sh, under `unshare -n` (home_assistant.py's `run_driver` does that).

It brings loopback up in the fresh network namespace, starts the backend (the daemon, or `FakeOllama` below),
writes HA's configuration for the spec's home (ha_config.py), starts `hass --skip-pip`, onboards a user, gets a
long-lived token, runs the Ollama config flow and options flow, gives entities their areas and exposes them to
Assist, then runs the spec's steps and writes the results. Every wait is bounded; every child is killed at the
end, whatever happens. Stdlib at import time; aiohttp and yaml (the HA venv's) are imported where used.

A spec: {"home": {...}, "daemon": [command] | "fake": {"tool_calls": {text: calls}, "reply": text}, "options":
{...}, "steps": [{"do": "converse" | "state" | "service" | "script" | "options" | "sleep", "name": ..., ...}]}.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ha_config import ha_configuration

MODEL = "qwen-edge:latest"
CLIENT_ID = "http://127.0.0.1/"  # IndieAuth client id of the onboarding user's token
LOG_TAIL = 6000  # characters of HA's log attached to a failure


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG), so a killed test or
    driver leaves no Home Assistant or daemon behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def log_tail(path: Path, n: int = LOG_TAIL) -> str:
    """The end of a log, without HA's per-token "Received delta" lines (its "Received response" lines remain)."""
    try:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        return ""
    return "".join(line for line in lines if "] Received delta: " not in line)[-n:]


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
        results["ha_log"] = log_tail(workdir / "ha" / "home-assistant.log")
        if daemon_log is not None:
            results["daemon_log"] = log_tail(daemon_log, 3000)
    return results


def driver_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    results = asyncio.run(drive(spec))
    Path(out_path).write_text(json.dumps(results, ensure_ascii=False, indent=1))
    return 1 if results.get("error") else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json OUT.json")
    sys.exit(driver_main(sys.argv[1], sys.argv[2]))
