"""Values the engine hands out: plain, immutable, easy to serialise for every protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()   # assistant messages that called tools
    tool_call_id: str = ""                  # tool messages: which call this is the result of
    note: str = ""                          # a system note shown right before it (the emotion hint)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request overrides; None means the configured default (settings.chat)."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ChatStats:
    prompt_tokens: int = 0        # tokens of the whole prompt
    cached_tokens: int = 0        # of those, already in the KV cache (not evaluated again)
    completion_tokens: int = 0
    finish_reason: str = "stop"   # "stop" | "length" | "tool_calls" | "timeout" | "cancelled" | "error"
    ttft_ms: float = 0.0
    decode_tps: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
