"""Turn messages into token ids with the model's own chat template, safely.

The template (Jinja, from the GGUF's `tokenizer.chat_template`) is rendered with placeholder
contents; the text around placeholders is tokenized *with* special tokens, the user's content
*without*. So `<|im_start|>system` typed by a user stays plain text and can never open a turn.
Tool definitions and tool calls, which a template renders itself (`tools | tojson`), are template
text: the caller checks them for control tokens first (`control_tokens_in`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge.engine.types import ChatMessage, ToolCall

# Used when a GGUF has no template: ChatML, what every Qwen chat model speaks.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use code points: no real text contains them
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_\ue002", "description": "",
                                                 "parameters": {"type": "object", "properties": {}}}}

Tokenize = Callable[[str, bool], list[int]]


class ChatTemplateError(ValueError):
    pass


class ChatTemplate:
    def __init__(self, source: str | None, tokenize: Tokenize) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson  # as Hugging Face renders templates: no HTML escaping
        self._tokenize = tokenize
        self.source = source or CHATML
        try:
            self._template = env.from_string(self.source)
            self._probe()
        except (TemplateError, ChatTemplateError) as exc:
            if self.source == CHATML:
                raise
            self.source = CHATML  # a template we cannot render safely: fall back, do not fail
            self._template = env.from_string(CHATML)
            self.fallback_reason: str | None = str(exc)
        else:
            self.fallback_reason = None
        self.supports_tools = self._renders_tools()

    def _renders_tools(self) -> bool:
        """Whether the template writes tool definitions itself (Qwen2.5's does, ChatML does not)."""
        try:
            text = self._render([ChatMessage("system", "s"), ChatMessage("user", "u")], True, [_PROBE_TOOL])
        except (TemplateError, ChatTemplateError):
            return False
        return "probe_tool_\ue002" in text

    def _probe(self) -> None:
        text = self._render([ChatMessage("system", "\ue0000\ue001"), ChatMessage("user", "\ue0001\ue001")], True)
        if [m.group(1) for m in _MARK.finditer(text)] != ["0", "1"]:
            raise ChatTemplateError("template does not place message contents verbatim")

    def _render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        return self._template.render(messages=[_as_dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, bos_token="", eos_token="",
                                     **extra)

    def tokens(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
               known: Callable[[str], list[int] | None] | None = None, tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation. `known(text)` may supply the exact ids an assistant reply
        was generated with, so a re-sent history matches the KV cache token for token."""
        return [t for seg in self.segments(messages, add_generation_prompt, known, tools) for t in seg]

    def segments(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                 known: Callable[[str], list[int] | None] | None = None,
                 tools: list[dict] | None = None) -> list[list[int]]:
        """Alternating [template, content, template, content, ..., template] token lists."""
        # a tool-calling turn without text stays empty: templates write it differently (no newline
        # before the call)
        placeholders = [ChatMessage(m.role, "" if m.tool_calls and not m.content else f"\ue000{i}\ue001",
                                    m.tool_calls, m.tool_call_id) for i, m in enumerate(messages)]
        rendered = self._render(placeholders, add_generation_prompt, tools)
        out: list[list[int]] = []
        pos = 0
        for match in _MARK.finditer(rendered):
            out.append(self._tokenize(rendered[pos:match.start()], True) if match.start() > pos else [])
            msg = messages[int(match.group(1))]
            ids = known(msg.content) if known and msg.role == "assistant" else None
            out.append(ids if ids is not None else self._tokenize(msg.content, False))
            pos = match.end()
        out.append(self._tokenize(rendered[pos:], True) if pos < len(rendered) else [])
        return out


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _call_dict(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _as_dict(m: ChatMessage) -> dict:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [_call_dict(c) for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out
