"""The access log: one INFO line per request on the ``edge.api.access`` logger (the journal under
systemd), written when the last byte has been sent, so a stream logs when it ends.

    127.0.0.1 "POST /api/chat" 200 1.84s prompt=41 cached=25 completion=12
    127.0.0.1 "POST /v1/sentiment" 401 0.00s

Method, path, status, duration and token counts; never a request's or reply's text. The path is
logged as sent (still percent-encoded, so it cannot hold a line break), without the query string,
and cut to MAX_PATH.
"""
from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.types import Scope

from edge.engine.types import ChatStats

log = logging.getLogger(__name__)
MAX_PATH = 200
USAGE_KEY = "usage"   # where a request's token counts wait in its ASGI state until the line is written


def add_usage(request: Request, **counts: int) -> None:
    """Add token counts to the request's access-log line (a reply and its sentiment add up)."""
    usage = request.scope.setdefault("state", {}).setdefault(USAGE_KEY, {})
    for name, value in counts.items():
        usage[name] = usage.get(name, 0) + value


def add_chat_usage(request: Request, stats: ChatStats) -> None:
    add_usage(request, prompt=stats.prompt_tokens, cached=stats.cached_tokens, completion=stats.completion_tokens)


def log_request(scope: Scope, status: int, seconds: float) -> None:
    client = scope.get("client")
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    usage = scope.get("state", {}).get(USAGE_KEY, {})
    log.info("%s \"%s %s\" %d %.2fs%s", client[0] if client else "-", scope["method"], target[:MAX_PATH], status,
             seconds, "".join(f" {name}={value}" for name, value in usage.items()))
