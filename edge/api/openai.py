"""OpenAI-compatible API: POST /v1/chat/completions (SSE stream or one JSON), GET /v1/models[/{id}].

Any model name is served by the one loaded model (OpenAI clients often insist on sending one).
`tools` / `tool_choice` / `parallel_tool_calls` and `response_format` (json_object, json_schema)
are enforced by a grammar; fields whose absence a client would misread (logprobs, images) are
refused with a 400; others (user, ...) are accepted and ignored.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from edge.api.common import (
    ClientMessage,
    json_grammar,
    open_chat,
    refuse_fields,
    reply_format,
    sampling,
    serving_of,
    sse,
    streaming,
    to_chat_messages,
)
from edge.api.errors import ApiError, error_body
from edge.api.streaming import ChatStream
from edge.engine.grammar import JSON_OBJECT_GBNF
from edge.engine.types import ChatStats, ToolCall

router = APIRouter()
SSE_DONE = b"data: [DONE]\n\n"
# engine finish reason -> OpenAI finish_reason
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop", "error": "stop",
                  "tool_calls": "tool_calls"}
# request field -> why it is refused (an empty logprobs list would look like an answer)
REFUSED_FIELDS = {"logprobs": "this server does not return token log probabilities",
                  "top_logprobs": "this server does not return token log probabilities"}


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    json_schema: dict | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # user, metadata, ...: accepted, unused
    model: str = ""
    messages: list[OpenAIMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice is generated")
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """GBNF for `response_format`: any JSON object, or JSON matching the given schema."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_GBNF
    if fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object")
        # strict or not, the grammar enforces the schema: a keyword it cannot enforce is refused
        return json_grammar(schema, "response_format.json_schema.schema")
    raise ApiError(400, f"response_format.type {fmt.type!r} is not supported (text, json_object, json_schema)")


def usage(stats: ChatStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _model(request: Request) -> dict:
    serving = serving_of(request)
    return {"id": serving.settings.server.model_name, "object": "model", "created": int(serving.started_at),
            "owned_by": "qwen-edge"}


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model(request)]})


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> JSONResponse:
    entry = _model(request)
    if model_id != entry["id"]:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {entry['id']!r}", "model_not_found")
    return JSONResponse(entry)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    if not body.messages:
        raise ApiError(400, "messages is empty")
    refuse_fields(body.model_extra or {}, REFUSED_FIELDS)
    messages = to_chat_messages((ClientMessage(m.role, m.content, m.tool_calls, m.tool_call_id)
                                 for m in body.messages), request)
    params = sampling(body.temperature, body.top_p, None, body.max_completion_tokens or body.max_tokens,
                      body.seed, body.stop)
    fmt = reply_format(response_grammar(body.response_format), body.tools, body.tool_choice, body.parallel_tool_calls)
    chat = await open_chat(request, messages, params, fmt)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": serving_of(request).settings.server.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(_chunks(chat, meta, include_usage), "text/event-stream",
                         lambda message: sse(error_body("/v1/", 500, message, "generation_error")))
    text = await chat.text()
    message: dict = {"role": "assistant", "content": text or (None if chat.stats.tool_calls else "")}
    if chat.stats.tool_calls:
        message["tool_calls"] = [_call(c) for c in chat.stats.tool_calls]
    return JSONResponse({**meta, "object": "chat.completion", "choices": [{
        "index": 0, "message": message,
        "finish_reason": FINISH_REASONS.get(chat.stats.finish_reason, "stop"), "logprobs": None}],
        "usage": usage(chat.stats)})


def _call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _chunk(meta: dict, delta: dict, finish_reason: str | None = None) -> bytes:
    return sse({**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})


async def _chunks(chat: ChatStream, meta: dict, include_usage: bool) -> AsyncIterator[bytes]:
    yield _chunk(meta, {"role": "assistant", "content": ""})
    async for piece in chat.pieces():
        yield _chunk(meta, {"content": piece})
    for i, call in enumerate(chat.stats.tool_calls):  # a call is sent once it is complete
        yield _chunk(meta, {"tool_calls": [{"index": i, **_call(call)}]})
    yield _chunk(meta, {}, FINISH_REASONS.get(chat.stats.finish_reason, "stop"))
    if include_usage:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(chat.stats)})
    yield SSE_DONE
