"""Pieces every protocol module shares: message conversion, starting a chat, stream framing."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from edge.api.admission import ClientGone
from edge.api.errors import ApiError, classify_exception, message_of
from edge.api.security import check_text_length
from edge.api.serving import ServingState
from edge.api.streaming import ChatStream
from edge.engine.grammar import GrammarError, schema_gbnf
from edge.engine.reply import ReplyFormat
from edge.engine.tools import ToolError, parse_tools, routed, routed_message
from edge.engine.types import ChatMessage, SamplingParams, ToolCall

log = logging.getLogger(__name__)

# role as clients send it -> the engine's role; developer is OpenAI's newer name for system
ROLES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                         "tool": "tool"}
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


@dataclass(frozen=True)
class ClientMessage:
    """One message as a client sent it, before checks: OpenAI's and Ollama's shapes both fit."""
    role: str
    content: object
    tool_calls: list | None = None
    tool_call_id: str | None = None


def _arguments(value: object, where: str) -> dict:
    """A call's arguments: an object (Ollama) or a JSON string of one (OpenAI)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ApiError(400, f"{where}.arguments is not valid JSON") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}.arguments must be a JSON object")
    return value


def tool_calls_of(raw: list | None, where: str) -> tuple[ToolCall, ...]:
    calls = []
    for i, entry in enumerate(raw or []):
        fn = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}.tool_calls[{i}] must hold function.name")
        calls.append(ToolCall(fn["name"], _arguments(fn.get("arguments"), f"{where}.tool_calls[{i}].function"),
                              str(entry.get("id") or "")))
    return tuple(calls)


def to_chat_messages(raw: Iterable[ClientMessage], request: Request) -> list[ChatMessage]:
    messages = []
    for i, m in enumerate(raw):
        if m.role not in ROLES:
            raise ApiError(400, f"unknown message role {m.role!r} (use system, user, assistant or tool)")
        calls = tool_calls_of(m.tool_calls, f"messages[{i}]") if m.role == "assistant" else ()
        messages.append(ChatMessage(ROLES[m.role], content_text(m.content), calls,  # type: ignore[arg-type]
                                    str(m.tool_call_id or "")))
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ApiError(400, "messages must contain a non-empty user message")
    check_text_length((m.content for m in messages), serving_of(request).settings.server)
    return messages


def json_grammar(schema: object, where: str) -> str:
    """GBNF for a client's structured-output request; a 400 naming what cannot be enforced."""
    try:
        return schema_gbnf(schema, where)
    except GrammarError as exc:
        raise ApiError(400, f"{where} cannot be enforced: {exc}", "unsupported_schema") from None


def reply_format(grammar: str | None, tools: list | None, tool_choice: object = None,
                 parallel: bool | None = None) -> ReplyFormat:
    """What the reply must be: free text, JSON of `grammar`, text or calls of `tools` (with both: JSON
    or calls)."""
    try:
        spec = parse_tools(tools, tool_choice, parallel)
    except ToolError as exc:
        raise ApiError(400, str(exc)) from None
    return ReplyFormat(grammar=grammar, tools=spec)


def sampling(temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             max_tokens: int | None = None, seed: int | None = None,
             stop: str | list[str] | None = None) -> SamplingParams:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_tokens is not None and max_tokens <= 0:
        max_tokens = None  # Ollama's -1 / -2 mean "no limit": the configured limit applies
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                          stop=stops)


async def routed_format(request: Request, messages: list[ChatMessage], fmt: ReplyFormat) -> ReplyFormat:
    """`fmt` with the tool choice the routing task gives the user's latest message (Engine.route,
    with the task awaited here rather than holding a thread)."""
    serving = serving_of(request)
    routing = serving.engine.routing if serving.engine is not None else None
    message = routed_message(routing, fmt.tools, messages)
    if message is None or routing is None or fmt.tools is None:
        return fmt
    results = await serving.run_task(routing.task, [message], None, request)
    request.app.state.metrics.record_task(routing.task, results)
    return replace(fmt, tools=routed(fmt.tools, routing, results[0].label, results[0].probability))


async def open_chat(request: Request, messages: list[ChatMessage], params: SamplingParams,
                    fmt: ReplyFormat = ReplyFormat()) -> ChatStream:
    """Submit a chat and wait for its first piece: errors before generation become HTTP errors."""
    fmt = await routed_format(request, messages, fmt)
    handle = serving_of(request).chat(messages, params, fmt)
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
