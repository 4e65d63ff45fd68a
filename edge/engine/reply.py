"""One reply being generated, as a job of the batched engine: sampling with the request's settings,
the answer's grammar (structured output), and tool calls — opened by `<tool_call>`, by a bare `{`
or by a Markdown fence at the reply's start, from then on held to the tools' grammar (tools.py).
The conversation state it belongs to (slots, prompts, prefixes) is chat.py's.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from edge.engine.grammar import Grammar
from edge.engine.jobs import Job
from edge.engine.no_copy import CopyGuard
from edge.engine.tools import CALL_OPEN, CallWatch, ToolError, ToolSpec, call_gbnf, parse_calls
from edge.engine.types import ChatMessage, ChatStats, SamplingParams

if TYPE_CHECKING:
    from edge.engine.chat import ChatSessions

# Markdown fences a small model writes before a call as bare JSON ("```json\n{...}")
BARE_OPENERS = ("```json\n", "```json ", "```\n")


class ContextOverflow(ValueError):
    """The newest message alone does not fit the context."""


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


@dataclass(frozen=True)
class ReplyFormat:
    """What a reply must be: free text, JSON of a grammar (structured output), or text or tool calls."""
    grammar: str | None = None
    tools: ToolSpec | None = None


@dataclass
class ChatPrompt:
    messages: list[ChatMessage]  # as rendered: the system turn first, the oldest turns dropped if needed
    tokens: list[int]
    stable: int          # leading tokens worth keeping as a cached prefix
    own_system: bool     # the system turn is our persona alone (cached at once)



class GenerateJob(Job):
    """One reply: evaluate the prompt's new tokens, then sample token by token."""

    def __init__(self, sessions: ChatSessions, prompt: ChatPrompt, params: SamplingParams, fmt: ReplyFormat,
                 stats: ChatStats, emit: Callable[[str], None], on_end: Callable[["GenerateJob"], None] | None,
                 max_tokens: int) -> None:
        super().__init__()
        self.s, self.rt, self.prompt, self.params = sessions, sessions.rt, prompt, params
        self.stats, self.emit, self.on_end, self.max_tokens = stats, emit, on_end, max_tokens
        self.tools = fmt.tools if fmt.tools is not None and fmt.tools.active else None
        forced = self.tools is not None and self.tools.forced
        self.grammar: Grammar | None = None
        self.call_first: Grammar | None = None  # JSON format and tools: the first token picks which holds
        if forced and self.tools is not None:
            self.grammar = sessions.grammar(call_gbnf(self.tools, "forced"), "tools")
        elif fmt.grammar is not None:
            self.grammar = sessions.grammar(fmt.grammar, "response format")
            if self.tools is not None:
                self.call_first = sessions.grammar(call_gbnf(self.tools, "forced"), "tools")
        self.calling = forced
        self.watch = CallWatch() if self.tools is not None and self.grammar is None else None
        self.opening: str | None = ""  # the reply's first text while it may still open a bare call
        self.chain, self.preselect = sessions.sampler(params)
        n_copy = sessions.defaults.no_copy_tokens
        users = [m.content for m in prompt.messages if m.role == "user"]
        self.no_copy = (CopyGuard.of_messages(users, self.rt.tokenize, self.rt.piece, n_copy)
                        if n_copy and self.grammar is None else None)
        self.slot: Slot | None = None
        self.generated: list[int] = []
        self.text = ""        # reply text so far (content only)
        self.call_text = ""   # what the model wrote after <tool_call>
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.cancel_requested = False
        self.t_first: float | None = None
        self.created_perf = time.perf_counter()
        self.stats.finish_reason = "cancelled"

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested

    def start(self) -> bool:
        claimed = self.s.claim(self.prompt)
        if claimed is None:
            return False
        self.slot, reuse = claimed
        self.seq, self.pos = self.slot.seq, reuse
        self.pending = self.prompt.tokens[reuse:]
        self.stats.prompt_tokens, self.stats.cached_tokens = len(self.prompt.tokens), reuse
        return True

    def advance(self, n: int) -> None:
        assert self.slot is not None
        self.slot.tokens.extend(self.pending[:n])
        super().advance(n)

    def feed(self, logits: np.ndarray) -> None:
        if self.t_first is None:
            assert self.seq is not None
            self.s.keep_prefix(self.prompt, self.seq)
        self.generating = True
        if len(self.generated) >= self.max_tokens:
            self._end("length")
            return
        tok = self._sample(logits)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.stats.ttft_ms = (self.t_first - self.created_perf) * 1000
        if self.rt.is_end(tok):
            self._end("stop")
            return
        self.generated.append(tok)
        self.pending = [tok]
        piece = self.utf8.decode(self.rt.piece(tok))
        if self.calling:
            self.call_text += piece
        else:
            self._text(piece, tok)

    def _sample(self, logits: np.ndarray) -> int:
        if self.grammar is None:
            # a reply is never empty: clients show nothing, and Home Assistant fails on an empty
            # answer after a tool result
            first = not self.generated and not self.text
            if first and self.watch is not None and self.s.defaults.tool_call_bias:
                logits[self.s.call_openers()] += self.s.defaults.tool_call_bias
            if self.no_copy is not None:
                logits[self.no_copy.banned(self.generated)] = -np.inf
            return self.rt.sample(self.chain, self.rt.without_end(logits) if first else logits, self.preselect)
        if self.call_first is not None:
            return self._sample_first(logits, self.grammar, self.call_first)
        tok = self.rt.sample(self.chain, self.rt.whole_chars_only(logits), self.preselect, self.grammar.restrict)
        if not self.rt.is_end(tok):
            self.grammar.accept(tok)
        return tok

    def _sample_first(self, logits: np.ndarray, answer: Grammar, call: Grammar) -> int:
        """The first token of a reply that is JSON or tool calls: either grammar may allow it; the
        one that does holds from then on."""
        tok = self.rt.sample(self.chain, self.rt.whole_chars_only(logits), self.preselect,
                             lambda ids: np.union1d(answer.restrict(ids), call.restrict(ids)).astype(np.int32))
        self.call_first = None
        if len(call.restrict([tok])) and not len(answer.restrict([tok])):
            answer.close()
            self.grammar, self.calling = call, True
        else:
            call.close()
        if not self.rt.is_end(tok):
            assert self.grammar is not None  # the answer's grammar, or the call's
            self.grammar.accept(tok)
        return tok

    def _text(self, piece: str, tok: int) -> None:
        if self.watch is not None and self.opening is not None:
            opened = self._at_start(piece, tok)
            if opened is None:
                return
            piece = opened
        if self.watch is not None:
            piece = self.watch.feed(piece)
            if self.watch.opened:
                self._open_call(tok)
        self.text += piece
        stop_at = _find_stop(self.text, self.params.stop)
        if stop_at is not None:
            piece = piece[: max(0, len(piece) - (len(self.text) - stop_at))]
            self.text = self.text[:stop_at]
            if piece:
                self.emit(piece)
            self._end("stop")
            return
        if piece:
            self.emit(piece)

    def _at_start(self, piece: str, tok: int) -> str | None:
        """The start of a reply with tools: a `{` (after nothing, or after a Markdown fence such as
        ```json) opens a call written without its tags; text that may still become such an opening
        is held back. Returns the text to go on with, or None when the piece was consumed."""
        assert self.opening is not None
        seen = self.opening + piece
        if seen.lstrip().startswith("{") or any(seen.startswith(f) and seen[len(f):].lstrip().startswith("{")
                                                 for f in BARE_OPENERS):
            self.opening = None
            return None if self._open_bare_call(tok, piece) else seen
        head = seen.lstrip(" ")
        if any(f.startswith(head) or (head.startswith(f) and not head[len(f):].strip()) for f in BARE_OPENERS):
            self.opening = seen
            return None
        self.opening = None
        return seen

    def _open_bare_call(self, tok: int, piece: str) -> bool:
        """A reply that opens with `{` is a call written without its tags (small Qwen models often
        do that): the tools' grammar holds from its first token, when that token fits a call. A
        pretty-printed call's first token ("{\n", Qwen's one token for it) does not fit the
        grammar's compact JSON: it is replaced by the tokens of its text without the trailing
        whitespace (not evaluated yet, as in _open_call), and the grammar writes the rest compact."""
        assert self.tools is not None
        grammar = self.s.grammar(call_gbnf(self.tools, "bare"), "tools")
        tokens = [tok] if len(grammar.restrict([tok])) else self.rt.tokenize(piece.rstrip())
        for t in tokens:
            if not len(grammar.restrict([t])):
                grammar.close()
                return False
            grammar.accept(t)
        if not tokens:
            grammar.close()
            return False
        if tokens != [tok]:
            self.pending = tokens
            self.generated[-1:] = tokens
            self.generating = len(tokens) == 1  # several: evaluated as a prompt chunk
            piece = piece.rstrip()
        self.grammar, self.calling, self.call_text = grammar, True, piece
        return True

    def _open_call(self, tok: int) -> None:
        """The model wrote `<tool_call>`: from here on the grammar of the tools holds. A last token
        that wrote past the trigger is replaced by the tokens of its part of the trigger, so the
        grammar starts exactly after it."""
        assert self.tools is not None and self.watch is not None
        self.calling = True
        self.grammar = self.s.grammar(call_gbnf(self.tools, "opened"), "tools")
        if self.watch.overshoot:
            piece = self.rt.piece(tok).decode("utf-8", "replace")
            head = piece[: len(piece) - len(self.watch.overshoot)]
            self.pending = self.rt.tokenize(head, special=True)
            self.generated[-1:] = self.pending
            self.generating = len(self.pending) == 1  # several: evaluated as a prompt chunk

    def _end(self, reason: str) -> None:
        if self.opening:  # held back as a possible opening, never continued: it is text
            self.text += self.opening
            self.emit(self.opening)
            self.opening = None
        if self.watch is not None and not self.calling:
            tail = self.watch.flush()
            if tail:
                self.text += tail
                self.emit(tail)
        if self.calling:
            calls = parse_calls(CALL_OPEN + self.call_text)
            self.stats.tool_calls = calls
            reason = "tool_calls" if calls and reason == "stop" else reason
        self.stats.finish_reason = reason
        self.done = True

    def stop(self, now: float) -> None:
        self._end("timeout" if self.expired(now) and not self.cancelled else "cancelled")

    def release(self) -> None:
        self.stats.completion_tokens = len(self.generated)
        if self.t_first is not None and len(self.generated) > 1:
            self.stats.decode_tps = (len(self.generated) - 1) / max(1e-9, time.perf_counter() - self.t_first)
        if self.error is not None:
            self.stats.finish_reason = "error"
        elif not self.stats.tool_calls and self.stats.finish_reason in ("stop", "length"):
            self.s.remember(self.text, self.generated)
        llama_cpp.llama_sampler_free(self.chain)
        for grammar in (self.grammar, self.call_first):
            if grammar is not None:
                grammar.close()
        if self.slot is not None:
            self.slot.busy = False
            self.slot.last_used = time.monotonic()
        if self.on_end is not None:
            self.on_end(self)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


__all__ = ["ChatSessions", "ContextOverflow", "GenerateJob", "ReplyFormat", "ToolError"]
