"""`qwen-edge serve` on "localhost" (the default host) over real sockets: both loopbacks answer, the
DNS-rebinding, cross-site and key rules hold on each, and every request leaves an access-log line
on stderr (the journal under systemd)."""
from __future__ import annotations

import re
import socket
import subprocess

import httpx
import pytest

from robust_helpers import Daemon, wait_for
from serving_helpers import free_port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
LOOPBACKS = ("127.0.0.1", "[::1]")


def _default_host_daemon(model, folder, port: int, **sections: dict) -> Daemon:
    daemon = Daemon(model, folder, port, **sections)
    config = daemon.config.read_text()
    if "host" not in sections.get("server", {}):  # leave the host to the default
        daemon.config.write_text(re.sub(r"^host = .*\n", "", config, flags=re.M))
    return daemon


def test_default_host_serves_both_loopbacks_with_the_same_rules(tiny_gguf, tmp_path):
    port = free_port()
    daemon = _default_host_daemon(tiny_gguf, tmp_path, port).start()
    try:
        for address in LOOPBACKS:
            with httpx.Client(base_url=f"http://{address}:{port}", timeout=60) as c:
                assert c.get("/health").json()["status"] == "ready", address
                r = c.post("/v1/sentiment", content=b'{"text": "what a lovely morning"}')  # no Content-Type
                assert r.status_code == 200 and r.json()["label"] in ("positive", "negative"), address
                r = c.post("/v1/sentiment", json={"text": "hi"}, headers={"Host": f"attacker.example:{port}"})
                assert r.status_code == 403 and "not allowed" in r.json()["error"]["message"], address
                r = c.post("/v1/sentiment", json={"text": "hi"}, headers={"Origin": "http://attacker.example"})
                assert r.status_code == 403, address
        with socket.create_connection(("::1", port), timeout=10) as raw:   # a bare IPv6 socket, no client library
            raw.sendall(b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 200")
        log = wait_for(lambda: (t := daemon.log.read_text()) and '::1 "HEAD /" 200' in t and t, 10, "the access line")
        assert f"on http://127.0.0.1:{port} and http://[::1]:{port}" in log
        assert re.search(r'::1 "POST /v1/sentiment" 200 \d+\.\d\ds texts=1 text_tokens=\d+', log)
        assert '127.0.0.1 "POST /v1/sentiment" 403' in log and '::1 "POST /v1/sentiment" 403' in log
        assert "lovely" not in log
    finally:
        daemon.stop()


def test_key_is_required_on_both_loopbacks(tiny_gguf, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("both-loopbacks-key\n")
    port = free_port()
    daemon = _default_host_daemon(tiny_gguf, tmp_path, port, server={"host": "localhost",
                                                                     "api_key_file": str(key_file)}).start()
    try:
        for address in LOOPBACKS:
            with httpx.Client(base_url=f"http://{address}:{port}", timeout=60) as c:
                assert c.post("/v1/sentiment", json={"text": "hi"}).status_code == 401, address
                r = c.post("/v1/sentiment", json={"text": "hi"}, headers={"Authorization": "Bearer both-loopbacks-key"})
                assert r.status_code == 200, address
        log = wait_for(lambda: (t := daemon.log.read_text()) and '::1 "POST /v1/sentiment" 401' in t and t, 10,
                       "the 401 access line")
        assert '127.0.0.1 "POST /v1/sentiment" 401' in log
    finally:
        daemon.stop()


def test_a_taken_ipv6_port_is_a_one_line_refusal(tiny_gguf, tmp_path):
    port = free_port()
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::1", port))
        taken.listen()
        daemon = _default_host_daemon(tiny_gguf, tmp_path, port).start(wait=False)
        try:
            assert daemon.proc is not None
            assert daemon.proc.wait(timeout=90) == 1
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon kept running without its IPv6 address")
        finally:
            daemon.stop()
    log = daemon.log.read_text()
    assert f"cannot listen on localhost: ::1 port {port}: Address already in use" in log
    assert "Traceback" not in log
