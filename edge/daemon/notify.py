"""systemd's notify protocol (sd_notify(3)), without libsystemd: one datagram per message to
$NOTIFY_SOCKET, which may be a path or an abstract socket ("@name").

READY=1 once the model serves, STATUS=... for `systemctl status`, STOPPING=1 when a drain starts,
and WATCHDOG=1 every WATCHDOG_USEC/2 from a thread, only while the daemon is healthy (a hung
engine then stops the pings and systemd restarts the service).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()   # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval_s = _watchdog_interval(env)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """send(READY=1, STATUS="serving") -> one datagram "READY=1\\nSTATUS=serving"; False if not sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
            return True
        except OSError as exc:  # systemd gone or socket not ours: never fatal to the daemon
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str = "draining requests") -> None:
        self.send(STOPPING=1, STATUS=status)

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2 while ``healthy()``; no-op without a watchdog."""
        if not self.enabled or self.watchdog_interval_s is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._ping, args=(healthy,), name="watchdog", daemon=True)
        self._thread.start()

    def _ping(self, healthy: Callable[[], bool]) -> None:
        assert self.watchdog_interval_s is not None
        while not self._stop.wait(self.watchdog_interval_s):
            try:
                ok = healthy()
            except Exception:
                ok = False
            if ok:
                self.send(WATCHDOG=1)
            else:
                log.warning("unhealthy: watchdog ping withheld")

    def stop_watchdog(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process
    return int(usec) / 2 / 1e6
