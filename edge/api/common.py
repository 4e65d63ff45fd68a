"""Pieces every protocol module shares: message conversion, starting a chat, stream framing."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import StreamingResponse

from edge.api.errors import ApiError, classify_exception, message_of
from edge.api.security import check_text_length
from edge.api.serving import ChatStream, ClientGone, ServingState
from edge.engine.types import ChatMessage, SamplingParams

log = logging.getLogger(__name__)

# role as clients send it -> the engine's role; developer is OpenAI's newer name for system,
# tool results are shown to the model as user text (tool calling itself is not offered).
ROLES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                         "tool": "user"}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NO_IMAGES = "images are not supported: the model reads text only"
IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})   # OpenAI content part types holding an image


def serving_of(request: Request) -> ServingState:
    return request.app.state.serving


def content_text(content: object) -> str:
    """A message's text: a string, or OpenAI's list of parts (text parts joined, others refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                raise ApiError(400, NO_IMAGES, "unsupported")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"message part of type {kind!r} is not supported (text only)")
        return "\n".join(texts)
    raise ApiError(400, "message content must be a string or a list of text parts")


def refuse_images(images: Iterable[object]) -> None:
    """Ollama's ``images`` lists: refused, never dropped, so a client knows the picture was not seen."""
    if any(images):
        raise ApiError(400, NO_IMAGES, "unsupported")


def refuse_fields(values: dict[str, object], refused: dict[str, str]) -> None:
    """A request field we cannot honour (``refused``: name -> why), set to anything but null/false/0,
    is a 400 rather than silently ignored."""
    for name, why in refused.items():
        if values.get(name) not in (None, False, 0):
            raise ApiError(400, f"{name} is not supported: {why}", "unsupported")


def to_chat_messages(pairs: Iterable[tuple[str, object]], request: Request) -> list[ChatMessage]:
    messages = []
    for role, content in pairs:
        if role not in ROLES:
            raise ApiError(400, f"unknown message role {role!r} (use system, user or assistant)")
        messages.append(ChatMessage(ROLES[role], content_text(content)))  # type: ignore[arg-type]
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ApiError(400, "messages must contain a non-empty user message")
    check_text_length((m.content for m in messages), serving_of(request).settings.server)
    return messages


def sampling(temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             max_tokens: int | None = None, seed: int | None = None,
             stop: str | list[str] | None = None) -> SamplingParams:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_tokens is not None and max_tokens <= 0:
        max_tokens = None  # Ollama's -1 / -2 mean "no limit": the configured limit applies
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                          stop=stops)


async def open_chat(request: Request, messages: list[ChatMessage], params: SamplingParams) -> ChatStream:
    """Submit a chat and wait for its first piece: errors before generation become HTTP errors."""
    handle = serving_of(request).chat(messages, params)
    stream = ChatStream(handle, request, request.app.state.metrics.record_chat)
    try:
        await stream.prime()
    except BaseException:
        handle.cancel()
        raise
    return stream


def ndjson(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def framed(events: AsyncIterator[bytes], error_frame: Callable[[str], bytes]) -> AsyncIterator[bytes]:
    """Pass frames through; an error after the stream started becomes one last error frame."""
    try:
        async for frame in events:
            yield frame
    except ClientGone:
        return
    except Exception as exc:
        status, kind, _ = classify_exception(exc)
        if status >= 500:
            log.warning("stream ended by %s: %s", kind, exc)
        yield error_frame(message_of(exc))


def streaming(events: AsyncIterator[bytes], media_type: str, error_frame: Callable[[str], bytes]) -> StreamingResponse:
    return StreamingResponse(framed(events, error_frame), media_type=media_type, headers=STREAM_HEADERS)
