"""Streamed multi-turn chat over KV-cache slots.

Each slot is a llama.cpp sequence holding one conversation's tokens. A request (the whole message
list, as OpenAI/Ollama clients send it) goes to the slot that already holds the longest prefix of
its tokens; only the rest is evaluated. A new conversation starts from the cached system-prompt
sequence. Assistant replies keep the exact token ids they were sampled with, so a history sent back
by a client matches the cache token for token.
"""
from __future__ import annotations

import codecs
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edge.engine.chat_template import ChatTemplate
from edge.engine.runtime import KVCacheFull, LlamaRuntime
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.settings import ChatSettings

_MEMO_SIZE = 64
PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over


class ContextOverflow(ValueError):
    """The newest message alone does not fit the context."""


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatEngine:
    def __init__(self, rt: LlamaRuntime, template: ChatTemplate, system_prompt: str, system_seq: int,
                 slot_seqs: list[int], defaults: ChatSettings, reserved_tokens: int = 0) -> None:
        self.rt = rt
        self.template = template
        self.system_prompt = system_prompt
        self.system_seq = system_seq
        self.slots = [Slot(s) for s in slot_seqs]
        self.defaults = defaults
        self.reserved_tokens = reserved_tokens  # KV cells kept for the sentiment prefixes and work
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._system_tokens: list[int] | None = None

    # -- prompt building ------------------------------------------------------------------------
    def with_system(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages and messages[0].role == "system":
            return messages
        return [ChatMessage("system", self.system_prompt), *messages]

    def budget(self) -> int:
        """Tokens one conversation may occupy (prompt + reply)."""
        return max(64, self.rt.n_ctx - self.reserved_tokens)

    def fit(self, messages: list[ChatMessage], max_tokens: int) -> tuple[list[ChatMessage], list[int]]:
        """Drop the oldest turns (never the system prompt) until prompt + reply fit the budget."""
        msgs = self.with_system(messages)
        budget = self.budget()
        if len(msgs) - 1 > budget:  # every turn costs at least one token: older ones can never fit
            msgs = [msgs[0], *msgs[len(msgs) - budget:]]

        def keep(dropped: int) -> list[ChatMessage]:
            return [msgs[0], *msgs[1 + dropped:]]

        # Fewest dropped turns that fit, by bisection: one request with thousands of turns must not
        # hold the engine worker for minutes re-rendering the history once per dropped turn.
        lo, hi, found = 0, max(0, len(msgs) - 2), None
        while lo <= hi:
            mid = (lo + hi) // 2
            tokens = self.template.tokens(keep(mid), True, self._memo.get)
            if len(tokens) + max_tokens <= budget:
                found, hi = (mid, tokens), mid - 1
            else:
                lo = mid + 1
        if found is not None:
            return keep(found[0]), found[1]
        last = keep(max(0, len(msgs) - 2))
        tokens = self.template.tokens(last, True, self._memo.get)
        if len(tokens) + 16 <= budget:  # shorten the reply rather than fail
            return last, tokens
        raise ContextOverflow(f"the message is too long: {len(tokens)} tokens, context allows {budget}")

    def _system_prefix(self) -> list[int]:
        if self._system_tokens is None:
            segs = self.template.segments([ChatMessage("system", self.system_prompt), ChatMessage("user", "\ue0ff")])
            self._system_tokens = [t for seg in segs[:-2] for t in seg]
            self.rt.seq_rm(self.system_seq)
            self.rt.decode([(self.system_seq, self._system_tokens, 0)])
        return self._system_tokens

    # -- slots ----------------------------------------------------------------------------------
    def _claim_slot(self, tokens: list[int]) -> tuple[Slot, int]:
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise RuntimeError("no free chat slot")  # the scheduler never starts more chats than slots
        best = max(free, key=lambda s: (common_prefix(s.tokens, tokens), -s.last_used))
        reuse = common_prefix(best.tokens, tokens)
        sys_tokens = self._system_prefix()
        from_system = common_prefix(sys_tokens, tokens)
        if reuse < from_system:  # a fresh conversation: start from the cached system prompt
            best = min(free, key=lambda s: s.last_used)
            self.rt.seq_rm(best.seq)
            self.rt.seq_cp(self.system_seq, best.seq)
            best.tokens = list(sys_tokens)
            reuse = from_system
        reuse = min(reuse, len(tokens) - 1)  # evaluate at least one token to get logits
        self.rt.seq_rm(best.seq, reuse, -1)
        best.tokens = best.tokens[:reuse]
        best.busy = True
        return best, reuse

    def drop_idle(self) -> int:
        """Forget idle conversations (memory pressure). Returns how many were dropped."""
        n = 0
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                self.rt.seq_rm(slot.seq)
                slot.tokens = []
                n += 1
        self._memo.clear()
        return n

    def _evict_one(self, keep: Slot) -> bool:
        idle = [s for s in self.slots if s is not keep and not s.busy and s.tokens]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self.rt.seq_rm(victim.seq)
        victim.tokens = []
        return True

    def _decode(self, slot: Slot, tokens: list[int], pos: int) -> np.ndarray:
        while True:
            try:
                return self.rt.decode_one(slot.seq, tokens, pos)
            except KVCacheFull:
                if not self._evict_one(slot):
                    raise

    # -- generation -----------------------------------------------------------------------------
    def _sampler(self, p: SamplingParams) -> tuple[object, int | None]:
        """A llama.cpp sampler chain for these settings, and how many top tokens it can ever pick
        from (None: the whole vocabulary): top-k, plus the tokens the repeat penalty may demote."""
        d = self.defaults
        temp = d.temperature if p.temperature is None else p.temperature
        seed = d.seed if p.seed is None else p.seed
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if d.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(self.rt.n_vocab, PENALTY_LAST_N, d.repeat_penalty, 0.0, 0.0))
        if temp <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain, self._preselect(1)
        top_k = d.top_k if p.top_k is None else p.top_k
        add(llama_cpp.llama_sampler_init_top_k(top_k))
        add(llama_cpp.llama_sampler_init_top_p(d.top_p if p.top_p is None else p.top_p, 1))
        if d.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(d.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(temp))
        add(llama_cpp.llama_sampler_init_dist(seed if seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED))
        return chain, self._preselect(top_k)

    def _preselect(self, top_k: int) -> int | None:
        # a penalty below 1 promotes recent tokens from anywhere in the vocabulary: no shortcut then
        if top_k <= 0 or self.defaults.repeat_penalty < 1.0:
            return None
        return top_k + (PENALTY_LAST_N if self.defaults.repeat_penalty != 1.0 else 0)

    def stream(self, messages: list[ChatMessage], params: SamplingParams = SamplingParams(),
               stats: ChatStats | None = None) -> Iterator[str]:
        """Yield the reply piece by piece, one decoded token per step ('' while a character is
        incomplete). Closing the generator stops generation and frees the slot."""
        stats = stats if stats is not None else ChatStats()
        max_tokens = params.max_tokens or self.defaults.max_tokens
        msgs, tokens = self.fit(list(messages), max_tokens)
        max_tokens = min(max_tokens, self.budget() - len(tokens))
        t0 = time.perf_counter()
        slot, reuse = self._claim_slot(tokens)
        chain, preselect = self._sampler(params)
        stats.prompt_tokens, stats.cached_tokens, stats.finish_reason = len(tokens), reuse, "cancelled"
        generated: list[int] = []
        text = ""
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            logits = self._decode(slot, tokens[reuse:], reuse)
            slot.tokens = list(tokens)
            pos = len(tokens)
            t_first = None
            for _ in range(max_tokens):
                tok = self.rt.sample(chain, logits, preselect)
                if self.rt.is_end(tok):
                    stats.finish_reason = "stop"
                    break
                generated.append(tok)
                piece = utf8.decode(self.rt.piece(tok))
                text += piece
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_ms = (t_first - t0) * 1000
                stop_at = _find_stop(text, params.stop)
                if stop_at is not None:
                    yield piece[: max(0, len(piece) - (len(text) - stop_at))]
                    text = text[:stop_at]
                    stats.finish_reason = "stop"
                    break
                yield piece
                logits = self._decode(slot, [tok], pos)
                slot.tokens.append(tok)
                pos += 1
            else:
                stats.finish_reason = "length"
            stats.completion_tokens = len(generated)
            n_decoded = pos - len(tokens)  # single-token decodes since the first token was sampled
            if t_first is not None and n_decoded > 0:
                stats.decode_tps = n_decoded / max(1e-9, time.perf_counter() - t_first)
            self._remember(text, generated)
        finally:
            llama_cpp.llama_sampler_free(chain)
            slot.busy = False
            slot.last_used = time.monotonic()

    def _remember(self, text: str, tokens: list[int]) -> None:
        self._memo[text] = tokens
        self._memo.move_to_end(text)
        while len(self._memo) > _MEMO_SIZE:
            self._memo.popitem(last=False)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
