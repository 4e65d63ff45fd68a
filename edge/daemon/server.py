"""`qwen-edge serve`: resolve and check the model, bind, load, serve, drain.

Start-up order (each step can refuse with one line, before anything heavy happens):
    bind check (key) → model file (given, configured, or fetched + converted) → gguf check and
    memory plan → listen (/health says "loading") → load the model → READY=1 to systemd.
Signals: SIGTERM/SIGINT stop accepting, let in-flight requests finish (server.drain_timeout_s),
then exit 0; SIGHUP re-reads the config file and prompts (applied between replies).
"localhost" (the default host) listens on 127.0.0.1 and, where the machine has it, ::1.
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from edge.api import ServingState, create_app
from edge.api.security import check_bind, resolve_api_key
from edge.daemon.memory_guard import MemoryGuard
from edge.daemon.model_source import resolve_model
from edge.daemon.notify import Notifier
from edge.model.preflight import preflight
from edge.settings import Settings

log = logging.getLogger(__name__)
# server settings that a SIGHUP applies at once; host, port, key, model and memory need a restart
HOT_SERVER_FIELDS = ("queue_size", "request_timeout_s", "max_body_bytes", "max_text_chars", "model_name",
                     "allowed_hosts", "drain_timeout_s", "retry_after_s")
RESTART_FIELDS = {"server": ("host", "port", "api_key", "api_key_file", "insecure_no_key"),
                  "model": None, "memory": None}   # None: the whole section
# bind name -> the addresses it stands for. A client told "localhost" may try ::1 first, and
# /etc/hosts does not always give the name both addresses, so the daemon listens on both itself.
MULTI_ADDRESS_HOSTS: dict[str, tuple[str, ...]] = {"localhost": ("127.0.0.1", "::1")}
# bind errors meaning "this machine has no such address" (no IPv6 loopback): that address is skipped
ABSENT_ADDRESS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


def _bound(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: restart at once
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_sockets(host: str, port: int) -> list[socket.socket] | None:
    """Bound sockets for a host name that stands for several addresses (MULTI_ADDRESS_HOSTS); None
    for any other host, which uvicorn binds itself. Raises OSError if the first address cannot be
    bound, or another one for any reason but its absence from this machine."""
    addresses = MULTI_ADDRESS_HOSTS.get(host.strip().lower())
    if addresses is None:
        return None
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            try:
                sockets.append(_bound(address, port))
            except OSError as exc:
                if exc.errno not in ABSENT_ADDRESS or not sockets:
                    raise OSError(exc.errno, f"{address} port {port}: {exc.strerror}") from None
                log.info("not listening on %s: %s (no such address here)", address, exc.strerror)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def urls(host: str, port: int, sockets: list[socket.socket] | None) -> str:
    names = [sock.getsockname()[0] for sock in sockets] if sockets else [host]
    return " and ".join(f"http://[{n}]:{port}" if ":" in n else f"http://{n}:{port}" for n in names)


class DaemonServer(uvicorn.Server):
    """uvicorn's server, plus: load the model once listening, and tell systemd what happens."""

    def __init__(self, config: uvicorn.Config, serving: ServingState, model_path: Path, notifier: Notifier) -> None:
        super().__init__(config)
        self.serving = serving
        self.model_path = model_path
        self.notifier = notifier
        self.exit_code = 0
        self.urls = urls(config.host, config.port, None)

    async def startup(self, sockets: list | None = None) -> None:
        self.urls = urls(self.config.host, self.config.port, sockets)
        await super().startup(sockets)
        if not self.should_exit:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        from edge.engine.engine import Engine

        self.notifier.status(f"loading {self.model_path.name}")
        try:
            engine = Engine.load(self.model_path, self.serving.settings)
            self.notifier.status(f"evaluating the prompts of {len(engine.tasks)} tasks")
            engine.warm_up()  # no first request pays for a prompt prefix
            self.serving.attach(engine)
        except Exception as exc:
            log.error("cannot load %s: %s", self.model_path, exc)
            self.serving.fail(f"cannot load {self.model_path.name}: {exc}")
            self.exit_code = 1
            self.should_exit = True
            return
        cfg = self.config
        log.info("serving %s on %s", self.model_path.name, self.urls)
        self.notifier.ready(f"serving {self.model_path.name} on {cfg.host}:{cfg.port}")
        self.notifier.start_watchdog(lambda: self.serving.health in ("ready", "degraded"))

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            log.info("signal %d: draining in-flight requests", sig)
            self.notifier.stopping()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def apply_reload(serving: ServingState, new: Settings) -> None:
    """Apply re-read settings: chat defaults and prompts (engine rebuild), the hot server fields."""
    current = serving.settings
    old_chat, old_prompts = current.chat, current.prompts
    current.chat, current.prompts = new.chat, new.prompts   # the engine shares this Settings object
    try:
        if serving.engine is not None:
            serving.engine.reload_prompts()
    except Exception:
        current.chat, current.prompts = old_chat, old_prompts
        raise
    for name in HOT_SERVER_FIELDS:
        setattr(current.server, name, getattr(new.server, name))
    if serving.scheduler is not None:
        serving.scheduler.queue_size = new.server.queue_size
    ignored = [f"{section}.{name}" if name else section for section, names in RESTART_FIELDS.items()
               for name in (names or (None,))
               if (getattr(getattr(new, section), name) if name else getattr(new, section))
               != (getattr(getattr(current, section), name) if name else getattr(current, section))]
    log.warning("configuration and prompts reloaded%s",
                f"; changes to {', '.join(ignored)} need a restart" if ignored else "")


def _install_sighup(serving: ServingState, reload_settings: Callable[[], Settings]) -> None:
    def on_hup(signum: int, frame: object) -> None:
        def read() -> None:
            try:
                new = reload_settings()
            except Exception as exc:
                log.error("SIGHUP: keeping the running configuration: %s", exc)
                return
            serving.request_reload(lambda: apply_reload(serving, new))
        threading.Thread(target=read, name="reload", daemon=True).start()  # no file I/O in a handler

    signal.signal(signal.SIGHUP, on_hup)


def run(settings: Settings, model: Path | None = None,
        reload_settings: Callable[[], Settings] | None = None, progress: bool = False) -> int:
    """Serve until SIGTERM/SIGINT; the exit code. Refusals raise (one-line message):
    InsecureBind, ModelUnavailable, ModelFileError / ModelDoesNotFit."""
    server_cfg = settings.server
    api_key = resolve_api_key(server_cfg)
    check_bind(server_cfg, api_key)
    model_path = resolve_model(settings, model, progress=progress)
    preflight(model_path, settings)             # a broken or oversized model is refused before loading

    guard = MemoryGuard(settings.memory)
    serving = ServingState(settings, guard=guard)
    guard.on_pressure("drop-idle-sessions", serving.request_shed)
    app = create_app(serving, api_key)
    notifier = Notifier()
    config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(server_cfg.drain_timeout_s) or 1, lifespan="off",
                            server_header=False)
    server = DaemonServer(config, serving, model_path, notifier)
    try:
        sockets = listen_sockets(server_cfg.host, server_cfg.port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", server_cfg.host, exc.strerror)
        return 1
    if reload_settings is not None:
        _install_sighup(serving, reload_settings)
    # uvicorn re-raises the signal that stopped it once it is done; this no-op handler makes that
    # re-raise harmless, so a drained SIGTERM ends with exit code 0 (systemd: "inactive", not "failed").
    signal.signal(signal.SIGTERM, lambda *_: None)
    guard.start()
    try:
        server.run(sockets)
    finally:
        notifier.stop_watchdog()
        drained = serving.stop(drain=True, timeout=server_cfg.drain_timeout_s)
        guard.stop()
        if serving.engine is not None:
            serving.engine.close()
        log.info("stopped%s", "" if drained else " (some work was cut at the drain timeout)")
    if server.exit_code == 0 and not server.started:
        return 1  # could not bind; uvicorn has logged why
    return server.exit_code

