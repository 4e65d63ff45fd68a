"""Who may talk to the daemon, and how much they may send.

- A non-loopback bind needs a Bearer API key (from a file or the environment) unless the operator
  sets ``server.insecure_no_key``; the daemon refuses to start otherwise.
- On a loopback bind a web page elsewhere can still reach us through a DNS name that resolves to
  127.0.0.1 (DNS rebinding); the browser then sends that name as Host, so only loopback/local
  names (and ``server.allowed_hosts``) are accepted.
- Bodies larger than ``server.max_body_bytes`` and texts longer than ``server.max_text_chars`` are
  refused with 413 before any model work.
- A body is read as JSON whatever its Content-Type says (or without one), as Ollama does: litellm
  and the curl examples of Ollama's documentation send none. A web page elsewhere can therefore
  send a request body without a CORS preflight (``text/plain`` is a "simple request"), so requests
  that change or cost something (every method but GET/HEAD/OPTIONS) are refused when they come
  from another site: an ``Origin`` other than the address the request was sent to (or a name in
  ``server.allowed_hosts``), or, without an Origin, ``Sec-Fetch-Site: cross-site``/``same-site``.
  Browsers set both headers themselves; scripts cannot forge them.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.api.errors import ApiError, error_response
from edge.settings import ServerSettings

PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})   # no key needed: no data, no model work
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})          # read only: a cross-site page cannot read the answer
CROSS_SITE_FETCHES = frozenset({"cross-site", "same-site"})   # Sec-Fetch-Site values of another origin's page
DEFAULT_PORTS = {"http": 80, "https": 443}
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class InsecureBind(ValueError):
    """The configuration would expose the daemon without a key; the message says what to set."""


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve_api_key(server: ServerSettings) -> str | None:
    """The configured key: ``api_key_file`` wins over ``api_key``; an unreadable/empty file is an error."""
    if server.api_key_file is not None:
        try:
            key = Path(server.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InsecureBind(f"cannot read server.api_key_file {server.api_key_file}: {exc.strerror}") from None
        if not key:
            raise InsecureBind(f"server.api_key_file {server.api_key_file} is empty")
        return key
    return server.api_key or None


def check_bind(server: ServerSettings, api_key: str | None) -> None:
    if api_key or server.insecure_no_key or is_loopback(server.host):
        return
    raise InsecureBind(f"refusing to listen on {server.host} without an API key: set server.api_key_file "
                       f"(or QWEN_EDGE_SERVER__API_KEY), or server.insecure_no_key = true on a trusted network")


def check_text_length(texts: Iterable[str], server: ServerSettings) -> None:
    for text in texts:
        if len(text) > server.max_text_chars:
            raise ApiError(413, f"text is {len(text)} characters; the limit is {server.max_text_chars} "
                                "(server.max_text_chars)", "too_large")


def _host_name(raw: str) -> str:
    if raw.startswith("["):
        return raw[1:raw.find("]")] if "]" in raw else raw
    return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw


def _authority(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    """(host name, port) of ``netloc``, the port defaulting to the scheme's; None if unparseable."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        return (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None


def is_same_origin(origin: str, host: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether a browser's ``Origin`` is the daemon itself: the name and port the request was sent to
    (its ``Host``; a missing port is the Origin scheme's default), or a name the operator allows (a
    reverse proxy's public name). The scheme is not compared: nothing else can serve our port."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:   # "null" (sandboxed frames, file://), extensions
        return False
    own = _authority(parts.netloc, parts.scheme)
    if own is None:
        return False
    return own == _authority(host.strip(), parts.scheme) or own[0] in {h.lower() for h in allowed_hosts}


def cross_site_refusal(method: str, headers: dict[str, str], allowed_hosts: Iterable[str]) -> str | None:
    """Why a request is refused as cross-site (see the module docstring), or None."""
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None:
        if is_same_origin(origin, headers.get("host", ""), allowed_hosts):
            return None
        return f"requests from web pages at {origin.strip()[:100]!r} are refused (cross-site); " \
               "a reverse proxy's name can be added to server.allowed_hosts"
    if headers.get("sec-fetch-site", "").strip().lower() in CROSS_SITE_FETCHES:
        return "requests from other web sites are refused (Sec-Fetch-Site)"
    return None


def as_json_body(scope: Scope) -> None:
    """Read any request body as JSON (see the module docstring): the content type becomes JSON."""
    if scope["method"] in SAFE_METHODS:
        return
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    scope["headers"] = [*headers, JSON_CONTENT_TYPE]


class SecurityMiddleware:
    """Pure ASGI (streams pass through untouched): Host check, cross-site check, Bearer key, body size;
    bodies are then read as JSON whatever their Content-Type."""

    def __init__(self, app: ASGIApp, server: ServerSettings, api_key: str | None) -> None:
        self.app = app
        self.server = server
        self.api_key = api_key
        self.check_host = is_loopback(server.host)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.check_host and host is not None:
            name = _host_name(host.strip()).lower()
            allowed = {h.lower() for h in self.server.allowed_hosts}
            if not (is_loopback(name) or name in allowed):
                return 403, f"Host {name!r} is not allowed on a loopback bind (add it to server.allowed_hosts)", \
                    "forbidden_host"
        cross_site = cross_site_refusal(scope["method"], headers, self.server.allowed_hosts)
        if cross_site is not None:
            return 403, cross_site, "forbidden_origin"
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "unauthorized"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            return 413, f"request body is {length} bytes; the limit is {self.server.max_body_bytes} " \
                        "(server.max_body_bytes)", "too_large"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message, kind = refusal
            response = error_response(scope["path"], status, message, kind)
            if status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        as_json_body(scope)
        limit, seen, exceeded = self.server.max_body_bytes, 0, False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # chunked uploads have no Content-Length to check up front
                exceeded = True
                raise ApiError(413, "request body too large", "too_large")
            return message

        async def guarded_send(message: Message) -> None:
            # The framework turns a failed body read into its own 400; answer the real reason instead.
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                refusal = error_response(scope["path"], 413, f"request body exceeds {limit} bytes "
                                         "(server.max_body_bytes)", "too_large")
                await refusal(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)
