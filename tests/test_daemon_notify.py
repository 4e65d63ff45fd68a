"""sd_notify against a unix datagram socket the test owns: path and abstract addresses, watchdog."""
from __future__ import annotations

import os
import socket
import time

import pytest

from edge.daemon.notify import Notifier


def _receive_all(sock: socket.socket, wait_s: float) -> list[str]:
    sock.settimeout(0.05)
    messages, end = [], time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return messages


@pytest.fixture()
def path_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    yield sock, path
    sock.close()


def test_ready_status_and_stopping_reach_a_path_socket(path_socket):
    sock, path = path_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("serving tiny")
    n.stopping()
    got = _receive_all(sock, 0.3)
    assert got[0].split("\n") == ["READY=1", "STATUS=serving tiny", f"MAINPID={os.getpid()}"]
    assert got[1].split("\n") == ["STOPPING=1", "STATUS=draining requests"]


def test_abstract_socket_address():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"qwen-edge-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send(STATUS="hello")
        assert _receive_all(sock, 0.2) == ["STATUS=hello"]
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval_only_while_healthy(path_socket):
    sock, path = path_socket
    healthy = {"ok": True}
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == pytest.approx(0.1)
    n.start_watchdog(lambda: healthy["ok"])
    try:
        pings = _receive_all(sock, 0.65)
        assert 4 <= pings.count("WATCHDOG=1") <= 7
        healthy["ok"] = False
        time.sleep(0.15)
        _receive_all(sock, 0.05)
        assert _receive_all(sock, 0.4) == []  # a hung daemon stops pinging; systemd restarts it
    finally:
        n.stop_watchdog()


def test_without_notify_socket_or_for_another_pid_nothing_happens(path_socket):
    assert not Notifier({}).send(READY=1)
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"}).send(READY=1)  # logged, not raised
