"""Every error the API can answer, mapped in one place: exception type -> HTTP status and kind.

Bad input is always a 4xx with a one-line message; a full queue or memory pressure is a 503 with
Retry-After. The body follows the protocol of the path: Ollama clients read ``{"error": "..."}``,
OpenAI clients ``{"error": {"message", "type", "code"}}``.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.api.admission import ClientGone, MemoryPressure, NotReady, RequestTimeout
from edge.engine.batcher import ContextFull
from edge.engine.engine import TaskUnavailable
from edge.engine.grammar import SchemaUnsupported
from edge.engine.reply import ContextOverflow
from edge.engine.scheduler import QueueFull, SchedulerStopped
from edge.engine.task_runner import InputError, OutputLimit
from edge.engine.tasks import PromptError
from edge.engine.tools import ToolError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error raised by the protocol modules themselves (unknown model, text too long, 501...)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


# exception type -> (HTTP status, error kind, send Retry-After); first match wins (order matters).
ERROR_TABLE: list[tuple[type[BaseException], int, str, bool]] = [
    (QueueFull, 503, "overloaded", True),
    (SchedulerStopped, 503, "shutting_down", True),
    (NotReady, 503, "not_ready", True),
    (MemoryPressure, 503, "memory_pressure", True),
    (RequestTimeout, 504, "timeout", False),
    (ContextFull, 503, "context_full", True),
    (InputError, 400, "invalid_input", False),
    (ContextOverflow, 400, "context_overflow", False),
    (ToolError, 400, "invalid_tools", False),
    (SchemaUnsupported, 400, "unsupported_schema", False),
    (TaskUnavailable, 404, "task_not_found", False),
    (OutputLimit, 422, "output_limit", False),
    (PromptError, 500, "prompt_error", False),
]

STATUS_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                403: "forbidden", 413: "too_large", 501: "not_implemented"}


def error_body(path: str, status: int, message: str, kind: str) -> dict:
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(path: str, status: int, message: str, kind: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    # Messages quote request values: keep them one line, and encodable (a JSON "\ud800" escape
    # gives a lone surrogate that UTF-8 cannot encode).
    message = " ".join(message.encode("utf-8", errors="replace").decode("utf-8").split())
    return JSONResponse(error_body(path, status, message, kind), status_code=status, headers=headers)


def classify_exception(exc: BaseException) -> tuple[int, str, bool]:
    """(status, kind, retry) for an exception; unknown ones are 500 internal_error."""
    if isinstance(exc, ApiError):
        return exc.status, exc.kind, False
    for exc_type, status, kind, retry in ERROR_TABLE:
        if isinstance(exc, exc_type):
            return status, kind, retry
    return 500, "internal_error", False


def message_of(exc: BaseException) -> str:
    status, kind, _ = classify_exception(exc)
    if status == 500 and kind == "internal_error":
        return "internal error (see the daemon's log)"
    return str(exc) or kind.replace("_", " ")


def validation_error(exc: RequestValidationError) -> tuple[int, str]:
    """(status, message) of a request the framework could not validate: a body that is not JSON, or
    not a JSON object, is a bad request (400, as Ollama answers it); a field of the wrong type or out
    of range is 422 with its path."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    if loc in (("body",), ("body", 0)):
        return 400, "the body must be a JSON object" if first.get("type") != "missing" else "send a JSON body"
    where = ".".join(str(p) for p in loc if p != "body")
    return 422, f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def install_error_handlers(app: FastAPI) -> None:
    retry_after = lambda request: request.app.state.serving.settings.server.retry_after_s  # noqa: E731

    async def on_exception(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientGone):
            return Response(status_code=499)
        status, kind, retry = classify_exception(exc)
        if status >= 500 and kind == "internal_error":
            log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(request.url.path, status, message_of(exc), kind,
                              retry_after(request) if retry else None)

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        status, message = validation_error(exc)
        return error_response(request.url.path, status, message, "invalid_request")

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = STATUS_KINDS.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else kind
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(request.url.path, exc.status_code, message, kind)

    # Starlette types every handler as taking Exception; it calls each only with its own class
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    # Known types get their own handler: Starlette re-raises (and logs a traceback for) anything
    # that only the catch-all Exception handler catches.
    for exc_type in (ApiError, ClientGone, *(row[0] for row in ERROR_TABLE)):
        app.add_exception_handler(exc_type, on_exception)
    app.add_exception_handler(Exception, on_exception)
