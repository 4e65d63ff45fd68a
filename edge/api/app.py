"""The FastAPI app: routers of each protocol, errors mapped once, security and metrics around it all."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from edge import __version__
from edge.api import health, native, ollama, openai
from edge.api.errors import install_error_handlers
from edge.api.metrics import ApiMetrics, MetricsMiddleware
from edge.api.security import SecurityMiddleware, resolve_api_key
from edge.api.serving import ServingState

ROUTERS = (health.router, native.router, openai.router, ollama.router)
# What Ollama answers on / (GET and HEAD): its own CLI and many tools probe the server with it.
OLLAMA_ROOT_TEXT = "Ollama is running"


def _page() -> bytes:
    return resources.files("edge.api").joinpath("static/index.html").read_bytes()


def create_app(serving: ServingState, api_key: str | None = None) -> FastAPI:
    """An app serving ``serving`` (its engine may still be loading). ``api_key`` defaults to the
    one configured in ``serving.settings.server``."""
    app = FastAPI(title="qwen-edge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.state.metrics = ApiMetrics(serving)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    page = _page()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        # A browser asks for HTML and gets the chat page; a client probing for Ollama gets its answer.
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(page)
        return PlainTextResponse(OLLAMA_ROOT_TEXT)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    key = api_key if api_key is not None else resolve_api_key(serving.settings.server)
    # Added last = outermost: refusals are counted by the metrics middleware too.
    app.add_middleware(SecurityMiddleware, server=serving.settings.server, api_key=key)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
