"""qwen-edge's own API: tasks (GET /v1/tasks, POST /v1/tasks/{name}, POST /v1/sentiment for the
sentiment task) and POST /v1/respond (sentiment, then the reply).

/v1/respond with ``stream: true`` answers NDJSON events, the sentiment always first:
    {"type": "sentiment", "sentiment": {...}}
    {"type": "delta", "content": "..."}            (many)
    {"type": "done", "finish_reason": "stop", "usage": {...}}
    {"type": "error", "error": "..."}               (instead of done, if generation failed)
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from edge.api.common import ClientMessage, ndjson, sampling, serving_of, streaming, to_chat_messages
from edge.api.errors import ApiError
from edge.api.security import check_text_length
from edge.api.streaming import ChatStream
from edge.engine.chat import with_notes
from edge.engine.engine import EMOTION, SENTIMENT
from edge.engine.task_runner import TaskResult
from edge.engine.types import ChatMessage, ChatStats

router = APIRouter()
MAX_TEXTS = 256  # texts in one task request


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | list[str] = Field(description="One text, or a list of texts")
    language: Literal["zh", "en"] | None = Field(None, description="Prompt language; default: detected per text")


SentimentRequest = TaskRequest


class Message(BaseModel):
    role: str
    content: str


class RespondRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="The user's message (shortcut for one user message)")
    messages: list[Message] | None = Field(None, description="Whole conversation; sentiment is of the last "
                                                             "user message")
    stream: bool = False
    language: Literal["zh", "en"] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


def usage(stats: ChatStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
            "completion_tokens": stats.completion_tokens, "ttft_ms": round(stats.ttft_ms, 1),
            "decode_tps": round(stats.decode_tps, 1)}


async def run_task(request: Request, task: str, texts: list[str], language: str | None) -> list[TaskResult]:
    serving = serving_of(request)
    check_text_length(texts, serving.settings.server)
    results = await serving.run_task(task, texts, language, request)
    request.app.state.metrics.record_task(task, results)
    return results


async def _answer(request: Request, task: str, body: TaskRequest) -> JSONResponse:
    texts = [body.text] if isinstance(body.text, str) else body.text
    if not texts:
        raise ApiError(400, "text is an empty list")
    if len(texts) > MAX_TEXTS:
        raise ApiError(413, f"{len(texts)} texts in one request; the limit is {MAX_TEXTS}", "too_large")
    results = await run_task(request, task, texts, body.language)
    if isinstance(body.text, str):
        return JSONResponse(results[0].to_dict())
    return JSONResponse({"results": [r.to_dict() for r in results]})


@router.get("/v1/tasks")
async def tasks(request: Request) -> JSONResponse:
    engine = serving_of(request).engine
    listed = [t.spec.describe() for _, t in sorted(engine.tasks.items())] if engine is not None else []
    return JSONResponse({"tasks": listed})


@router.post("/v1/tasks/{name}")
async def task(name: str, body: TaskRequest, request: Request) -> JSONResponse:
    return await _answer(request, name, body)


@router.post("/v1/sentiment")
async def sentiment(body: TaskRequest, request: Request) -> JSONResponse:
    return await _answer(request, SENTIMENT, body)


@router.post("/v1/respond")
async def respond(body: RespondRequest, request: Request) -> Response:
    if (body.text is None) == (body.messages is None):
        raise ApiError(400, "send either 'text' or 'messages'")
    pairs = ([ClientMessage("user", body.text)] if body.text is not None else
             [ClientMessage(m.role, m.content) for m in body.messages or []])
    messages = await _with_emotion_hints(request, to_chat_messages(pairs, request))
    last_user = next(m.content for m in reversed(messages) if m.role == "user")
    # Both are submitted now; the sentiment's few tokens share the engine's next steps with the reply's prompt.
    label_task = asyncio.ensure_future(run_task(request, SENTIMENT, [last_user], body.language))
    params = sampling(body.temperature, body.top_p, None, body.max_tokens, body.seed)
    try:
        handle = serving_of(request).chat(messages, params)
    except BaseException:
        label_task.cancel()
        raise
    chat = ChatStream(handle, request, request.app.state.metrics.record_chat)
    try:
        label = (await label_task)[0]
    except BaseException:
        handle.cancel()
        raise
    if not body.stream:
        reply = await chat.text()
        return JSONResponse({"sentiment": label.to_dict(), "reply": reply,
                             "finish_reason": chat.stats.finish_reason, "usage": usage(chat.stats)})
    return streaming(_events(label, chat), "application/x-ndjson",
                     lambda message: ndjson({"type": "error", "error": message}))


async def _with_emotion_hints(request: Request, messages: list[ChatMessage]) -> list[ChatMessage]:
    """With chat.emotion_hints on, each user message carries the note of its emotion (engine.hinted)."""
    serving = serving_of(request)
    engine = serving.engine
    if not serving.settings.chat.emotion_hints or engine is None:
        return messages
    users = [m.content for m in messages if m.role == "user"]
    missing = engine.unknown_emotions(users)
    if missing:
        for text, result in zip(missing, await run_task(request, EMOTION, missing, None), strict=True):
            engine.remember_emotion(text, result.label or "")
    return with_notes(messages, engine.known_emotions(users), engine.prompts.emotion_hints)


async def _events(label: TaskResult, chat: ChatStream) -> AsyncIterator[bytes]:
    yield ndjson({"type": "sentiment", "sentiment": label.to_dict()})
    async for piece in chat.pieces():
        yield ndjson({"type": "delta", "content": piece})
    yield ndjson({"type": "done", "finish_reason": chat.stats.finish_reason, "usage": usage(chat.stats)})
