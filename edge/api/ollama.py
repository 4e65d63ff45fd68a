"""Ollama-compatible API, enough for Home Assistant's built-in Ollama integration (and the `ollama`
Python client it uses): tags, ps, version, show, chat, generate.

- One model is served; it is listed as ``<server.model_name>:latest``.
- ``options.num_ctx`` is accepted and capped to the context the memory budget allows (model.n_ctx),
  logged once; ``keep_alive`` is accepted (the model stays loaded).
- ``tools`` get text or calls of those tools (``message.tool_calls``, arguments as objects, sent in
  one chunk once complete, as Ollama streams them); ``format`` ("json" or a JSON schema) is
  enforced by a grammar.
- ``/api/pull`` of the served model answers success, as Ollama does for a model it already has.
- ``images`` (in messages, or on /api/generate) are refused with a 400: the model reads text only.
- Other model management (create, push, delete, copy) and embeddings answer 501, saying what is not
  supported, and never touch the filesystem.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from edge.api.common import (
    ClientMessage,
    json_grammar,
    ndjson,
    open_chat,
    refuse_images,
    reply_format,
    sampling,
    serving_of,
    streaming,
    to_chat_messages,
)
from edge.api.errors import ApiError
from edge.api.serving import ServingState
from edge.api.streaming import ChatStream
from edge.engine.grammar import JSON_OBJECT_GBNF
from edge.engine.reply import ReplyFormat
from edge.engine.types import ChatMessage, ChatStats, SamplingParams, ToolCall

log = logging.getLogger(__name__)
router = APIRouter()
OLLAMA_COMPAT_VERSION = "0.12.0"      # the Ollama API version whose endpoints we mirror
CAPABILITIES = ["completion", "tools"]  # /api/show: what works (tool calls are grammar-enforced)
NEVER_EXPIRES = "2318-01-01T00:00:00Z"
# endpoint -> what its 501 says is not supported
UNSUPPORTED = {
    "create": "creating models is not supported: this server serves the one model it was started with",
    "push": "uploading models is not supported",
    "delete": "deleting models is not supported: this server serves the one model it was started with",
    "copy": "copying models is not supported: this server serves the one model it was started with",
    "embed": "embeddings are not supported: this server only chats and classifies text",
    "embeddings": "embeddings are not supported: this server only chats and classifies text",
    "blobs/{digest}": "uploading model files is not supported",
}
# Ollama option -> SamplingParams field
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_tokens",
                 "seed": "seed", "stop": "stop"}


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # mirostat, num_gpu, ...: accepted, unused
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    num_ctx: int | None = Field(None, ge=1)


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # thinking, tool_name: accepted
    role: str
    content: str | None = ""
    images: list[Any] | None = None           # refused: the model reads text only
    tool_calls: list[Any] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    messages: list[OllamaMessage] = []
    stream: bool = True                       # Ollama streams unless told not to
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None
    tools: list[Any] | None = None
    format: Any = None
    think: Any = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    prompt: str = ""
    system: str | None = None
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None
    format: Any = None
    raw: bool = False
    images: list[Any] | None = None           # refused: the model reads text only


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    name: str = ""                            # older clients send "name"


class PullRequest(ShowRequest):
    stream: bool = True


def format_grammar(fmt: Any) -> str | None:
    """GBNF for Ollama's ``format``: "json" (any JSON object) or a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return JSON_OBJECT_GBNF
    if isinstance(fmt, dict):
        return json_grammar(fmt, "format")
    raise ApiError(400, 'format must be "json" or a JSON schema object')


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def model_tag(serving: ServingState) -> str:
    name = serving.settings.server.model_name
    return name if ":" in name else f"{name}:latest"


def check_model(serving: ServingState, name: str) -> str:
    tag = model_tag(serving)
    if name and name not in (tag, tag.removesuffix(":latest")):
        raise ApiError(404, f"model '{name}' not found; this server serves '{tag}'", "not_found")
    return tag


def _details(serving: ServingState) -> dict:
    info = serving.model_info
    arch = info.get("arch", "qwen2")
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": info.get("parameter_size", ""),
            "quantization_level": str(info.get("file_type", "")).upper()}


def _model_entry(serving: ServingState) -> dict:
    tag = model_tag(serving)
    info = serving.model_info
    return {"name": tag, "model": tag, "modified_at": info.get("modified_at", _now()),
            "size": info.get("size_bytes", 0), "digest": info.get("digest", ""), "details": _details(serving)}


def options_to_params(serving: ServingState, options: OllamaOptions | None) -> SamplingParams:
    opts = options or OllamaOptions()
    kwargs = {field: getattr(opts, key) for key, field in OPTION_FIELDS.items() if getattr(opts, key) is not None}
    n_ctx = serving.settings.model.n_ctx
    if opts.num_ctx is not None and opts.num_ctx > n_ctx and serving.note_once(f"num_ctx {opts.num_ctx}"):
        log.warning("a client asks for num_ctx %d; capped to model.n_ctx = %d, the context the memory budget "
                    "allows (longer histories lose their oldest turns, never the system prompt or tools)",
                    opts.num_ctx, n_ctx)
    return sampling(**kwargs)


def _call(call: ToolCall) -> dict:
    return {"function": {"name": call.name, "arguments": call.arguments}}


def _message(text: str, stats: ChatStats | None = None) -> dict:
    message: dict = {"role": "assistant", "content": text}
    if stats is not None and stats.tool_calls:
        message["tool_calls"] = [_call(c) for c in stats.tool_calls]
    return {"message": message}


def _final(tag: str, stats: ChatStats, t0: float, extra: dict) -> dict:
    total_ns = int((time.perf_counter() - t0) * 1e9)
    ttft_ns = int(stats.ttft_ms * 1e6)
    return {"model": tag, "created_at": _now(), **extra, "done": True,
            "done_reason": "length" if stats.finish_reason in ("length", "timeout") else "stop",
            "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": ttft_ns, "eval_count": stats.completion_tokens,
            "eval_duration": max(0, total_ns - ttft_ns)}


async def _reply(request: Request, tag: str, messages: list[ChatMessage], options: OllamaOptions | None, stream: bool,
                 piece_frame: Any, fmt: ReplyFormat) -> Response:
    """Shared by /api/chat and /api/generate: they differ only in how a piece is framed
    (`piece_frame(text, stats)`; stats is given with the final text, where tool calls go)."""
    t0 = time.perf_counter()
    chat = await open_chat(request, messages, options_to_params(serving_of(request), options), fmt)
    if not stream:
        text = await chat.text()
        return JSONResponse(_final(tag, chat.stats, t0, piece_frame(text, chat.stats)))

    async def frames(chat: ChatStream) -> AsyncIterator[bytes]:
        async for piece in chat.pieces():
            yield ndjson({"model": tag, "created_at": _now(), **piece_frame(piece, None), "done": False})
        if chat.stats.tool_calls:  # Ollama sends the calls in a chunk of their own, before the last one
            yield ndjson({"model": tag, "created_at": _now(), **piece_frame("", chat.stats), "done": False})
        yield ndjson(_final(tag, chat.stats, t0, piece_frame("", None)))

    return streaming(frames(chat), "application/x-ndjson", lambda message: ndjson({"error": message}))


@router.api_route("/api/version", methods=["GET", "HEAD"])  # HEAD too, as Ollama answers it
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_COMPAT_VERSION})


@router.api_route("/api/tags", methods=["GET", "HEAD"])  # HEAD too, as Ollama answers it
async def tags(request: Request) -> JSONResponse:
    serving = serving_of(request)
    return JSONResponse({"models": [_model_entry(serving)] if serving.status == "ready" else []})


@router.get("/api/ps")
async def ps(request: Request) -> JSONResponse:
    serving = serving_of(request)
    if serving.status != "ready":
        return JSONResponse({"models": []})
    entry = {**_model_entry(serving), "expires_at": NEVER_EXPIRES, "size_vram": 0,
             "context_length": serving.settings.model.n_ctx}
    return JSONResponse({"models": [entry]})


@router.post("/api/show")
async def show(body: ShowRequest, request: Request) -> JSONResponse:
    serving = serving_of(request)
    check_model(serving, body.model or body.name)
    info = serving.model_info
    c = serving.settings.chat
    params = (f"temperature {c.temperature}\ntop_p {c.top_p}\ntop_k {c.top_k}\n"
              f"num_ctx {serving.settings.model.n_ctx}\nnum_predict {c.max_tokens}")
    arch = info.get("arch", "qwen2")
    model_info = {"general.architecture": arch, "general.parameter_count": info.get("n_params"),
                  f"{arch}.context_length": info.get("n_ctx_train"), f"{arch}.block_count": info.get("n_layer"),
                  f"{arch}.embedding_length": info.get("n_embd")}
    return JSONResponse({"modelfile": f"FROM {info.get('path', '')}\n", "parameters": params, "template": "",
                         "license": "", "details": _details(serving), "model_info": model_info,
                         "modified_at": info.get("modified_at", _now()), "capabilities": CAPABILITIES})


@router.post("/api/pull")
async def pull(body: PullRequest, request: Request) -> Response:
    """The served model is already here: success, as Ollama answers for a model it has; nothing on
    disk is touched. Any other model is a 501: this server downloads nothing."""
    serving = serving_of(request)
    try:
        check_model(serving, body.model or body.name)
    except ApiError:
        raise ApiError(501, f"downloading models is not supported: this server serves {model_tag(serving)!r}, "
                            "the one model it was started with", "not_implemented") from None
    if body.stream:
        return Response(ndjson({"status": "success"}), media_type="application/x-ndjson")
    return JSONResponse({"status": "success"})


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    serving = serving_of(request)
    tag = check_model(serving, body.model)
    if not body.messages:  # Ollama's "load the model" (or, with keep_alive 0, "unload") request
        reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
        return JSONResponse({"model": tag, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": reason})
    refuse_images(m.images for m in body.messages)
    messages = to_chat_messages((ClientMessage(m.role, m.content, m.tool_calls) for m in body.messages), request)
    fmt = reply_format(format_grammar(body.format), body.tools)
    return await _reply(request, tag, messages, body.options, body.stream, _message, fmt)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    serving = serving_of(request)
    tag = check_model(serving, body.model)
    if not body.prompt:
        reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
        return JSONResponse({"model": tag, "created_at": _now(), "response": "", "done": True, "done_reason": reason})
    refuse_images([body.images])
    pairs = ([ClientMessage("system", body.system)] if body.system else []) + [ClientMessage("user", body.prompt)]
    messages = to_chat_messages(pairs, request)
    return await _reply(request, tag, messages, body.options, body.stream,
                        lambda text, _stats: {"response": text}, reply_format(format_grammar(body.format), None))


def _unsupported(what: str):
    async def refuse() -> Response:
        raise ApiError(501, what, "not_implemented")
    return refuse


for _action, _what in UNSUPPORTED.items():
    router.add_api_route(f"/api/{_action}", _unsupported(_what), methods=["POST", "DELETE", "HEAD", "GET"],
                         include_in_schema=False)
