"""Values the engine hands out: plain, immutable, easy to serialise for every protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class SentimentResult:
    label: str            # canonical id from prompts/labels.toml: "positive" | "negative" | "neutral"
    display: str          # the label as the model wrote it, e.g. "正面" or "Positive"
    probability: float    # softmax over the allowed labels' scores, 0..1
    language: str         # "zh" | "en": which prompt was used
    n_tokens: int         # tokens of the text after truncation
    truncated: bool       # the text was longer than prompts.max_text_tokens (head and tail kept)
    latency_ms: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


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
    finish_reason: str = "stop"   # "stop" | "length" | "cancelled" | "error"
    ttft_ms: float = 0.0
    decode_tps: float = 0.0
    extra: dict = field(default_factory=dict)
