"""Streamed multi-turn chat over KV-cache slots, as jobs of the batched engine.

Each slot is a llama.cpp sequence holding one conversation's tokens. A request (the whole message
list, as OpenAI/Ollama clients send it) goes to the slot that already holds the longest prefix of
its tokens, or starts from the longest cached prefix (prefixes.py) that it begins with; only the
rest is evaluated. Assistant replies keep the exact token ids they were sampled with, so a history
sent back by a client matches the cache token for token.

The system turn is built once per request (`ChatSessions.prompt`):
- the persona (prompts/chat/<lang>/system.txt, by the language of the last user message) is the
  system prompt; a client's own system message replaces it or follows it (chat.client_system);
- lines matching chat.volatile_lines (Home Assistant's "Current time is ...") are moved to the end
  of the system turn, after the tool definitions: what the model is told stays the same, and the
  long stable part before them is a prefix the next request can reuse;
- tools are written by the model's template when it knows them, else as text (tools.py).
The stable leading part of a prompt (the system turn up to any moved lines) is kept as a cached
prefix once it has been seen twice (the persona's at once): a new conversation with the same
system prompt, e.g. Home Assistant's a minute later, evaluates only its own new tokens.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace

import llama_cpp
import numpy as np

from edge.engine.chat_template import ChatTemplate
from edge.engine.grammar import Grammar
from edge.engine.prefixes import PrefixCache
from edge.engine.reply import BARE_OPENERS, ChatPrompt, ContextOverflow, GenerateJob, ReplyFormat, Slot
from edge.engine.runtime import LlamaRuntime
from edge.engine.tasks import pick_language
from edge.engine.tool_rules import ArgumentRules
from edge.engine.tools import (
    CALL_OPEN,
    ToolError,
    ToolSpec,
    render_fallback,
    shown_definitions,
)
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.settings import ChatSettings

MEMO_SIZE = 64
PENALTY_LAST_N = 64   # tokens the repeat penalty looks back over
MIN_CACHED_PREFIX = 32  # shorter system turns are not worth a prefix sequence
GRAMMAR_CACHE = 16    # compiled response / tool grammars kept for the next request


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def with_notes(messages: list[ChatMessage], labels: dict[str, str],
               notes: dict[str, dict[str, str]]) -> list[ChatMessage]:
    """Each user message whose text has a label gets that label's note (in its language) attached:
    the emotion hints of prompts/chat/hints.toml. A message's note depends on its text alone, so a
    history sent back renders the same tokens and stays in the cache."""
    out = []
    for m in messages:
        label = labels.get(m.content) if m.role == "user" else None
        note = notes.get(pick_language(m.content, notes), {}).get(label or "", "") if label and notes else ""
        out.append(replace(m, note=note) if note else m)
    return out


def split_volatile(text: str, patterns: list[re.Pattern]) -> tuple[str, str]:
    """`text` without the lines matching any pattern, and those lines (in order)."""
    kept: list[str] = []
    moved: list[str] = []
    for line in text.split("\n"):
        (moved if any(p.search(line) for p in patterns) else kept).append(line)
    return "\n".join(kept).strip("\n"), "\n".join(moved)


def tool_rounds(messages: list[ChatMessage]) -> int:
    """Assistant turns with tool calls since the last user message."""
    rounds = 0
    for m in reversed(messages):
        if m.role == "user":
            break
        rounds += bool(m.role == "assistant" and m.tool_calls)
    return rounds


class ChatSessions:
    def __init__(self, rt: LlamaRuntime, template: ChatTemplate, personas: dict[str, str], slot_seqs: list[int],
                 defaults: ChatSettings, prefixes: PrefixCache, budget_tokens: int,
                 rules: ArgumentRules | None = None) -> None:
        self.rt = rt
        self.template = template
        self.personas = personas
        self.slots = [Slot(s) for s in slot_seqs]
        self.defaults = defaults
        self.prefixes = prefixes
        self.budget_tokens = budget_tokens  # KV cells one conversation may occupy (prompt + reply)
        self.rules = rules or ArgumentRules()  # tool argument rules (prompts/tools/argument_values.toml)
        self.volatile = [re.compile(p) for p in defaults.volatile_lines]
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._seen: Counter[str] = Counter()
        self._grammars: OrderedDict[str, Grammar] = OrderedDict()
        self._openers: np.ndarray | None = None
        self._eot = self._end_of_turn()

    def _end_of_turn(self) -> set[int]:
        ids = self.rt.tokenize("<|im_end|>", special=True)
        return set(ids) if len(ids) == 1 else set()

    # -- prompt building ------------------------------------------------------------------------
    def with_system(self, messages: list[ChatMessage]) -> tuple[list[ChatMessage], bool]:
        """The conversation with its system turn first; True when that turn is the persona alone."""
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        persona = self.personas[pick_language(last_user, self.personas)]
        if messages and messages[0].role == "system":
            client = messages[0].content
            if self.defaults.client_system == "replace" or not persona:
                return messages, False
            return [ChatMessage("system", f"{persona}\n\n{client}"), *messages[1:]], False
        return [ChatMessage("system", persona), *messages], True

    def _render(self, msgs: list[ChatMessage], tools: ToolSpec | None) -> tuple[list[int], int]:
        """Tokens of the prompt and how many lead up to the first moved line or user content."""
        stable_text, moved = split_volatile(msgs[0].content, self.volatile)
        msgs = [ChatMessage("system", stable_text),
                *(n for m in msgs[1:] for n in ([ChatMessage("system", m.note)] if m.note else []) + [m])]
        tool_defs = None
        if tools is not None and tools.tools:
            if self.template.supports_tools:
                tool_defs = shown_definitions(tools)
            else:
                msgs = render_fallback(msgs, tools)
        elif any(m.role == "tool" or m.tool_calls for m in msgs):
            msgs = render_fallback(msgs, None)
        segs = self.template.segments(msgs, True, self._memo.get, tool_defs)
        head = len(segs[0]) + len(segs[1])
        after = segs[2] if len(segs) > 2 else []
        if not moved:
            stable = head + len(after)
            return [t for seg in segs for t in seg], stable
        at = next((i for i, t in enumerate(after) if t in self._eot), 0 if not after else len(after))
        inserted = self.rt.tokenize("\n" + moved)
        tokens = segs[0] + segs[1] + after[:at] + inserted + after[at:] + [t for seg in segs[3:] for t in seg]
        return tokens, head + at

    def prompt(self, messages: list[ChatMessage], max_tokens: int, tools: ToolSpec | None = None) -> ChatPrompt:
        """Drop the oldest turns (never the system turn or the tools) until prompt + reply fit."""
        msgs, own = self.with_system(list(messages))
        budget = self.budget_tokens
        if len(msgs) - 1 > budget:  # every turn costs at least one token: older ones can never fit
            msgs = [msgs[0], *msgs[len(msgs) - budget:]]

        def keep(dropped: int) -> list[ChatMessage]:
            return [msgs[0], *msgs[1 + dropped:]]

        # Fewest dropped turns that fit, by bisection: one request with thousands of turns must not
        # hold the engine for minutes re-rendering the history once per dropped turn.
        lo, hi, found = 0, max(0, len(msgs) - 2), None
        while lo <= hi:
            mid = (lo + hi) // 2
            tokens, stable = self._render(keep(mid), tools)
            if len(tokens) + max_tokens <= budget:
                found, hi = (mid, tokens, stable), mid - 1
            else:
                lo = mid + 1
        if found is None:
            last = max(0, len(msgs) - 2)
            tokens, stable = self._render(keep(last), tools)
            if len(tokens) + 16 > budget:  # shorten the reply rather than fail, but not to nothing
                raise ContextOverflow(f"the message is too long: {len(tokens)} tokens, context allows {budget}")
            found = (last, tokens, stable)
        return ChatPrompt(keep(found[0]), found[1], found[2], own)

    def fit(self, messages: list[ChatMessage], max_tokens: int) -> tuple[list[ChatMessage], list[int]]:
        """The messages and tokens a reply of `max_tokens` to `messages` is generated from."""
        prompt = self.prompt(messages, max_tokens)
        return prompt.messages, prompt.tokens

    # -- slots ----------------------------------------------------------------------------------
    def claim(self, prompt: ChatPrompt) -> tuple[Slot, int] | None:
        """A free slot holding as much of the prompt as possible, and how much; None when all are busy.
        A new conversation (no slot shares its system turn) takes an empty or the least recently
        used slot, so it never overwrites a conversation that may continue."""
        tokens = prompt.tokens
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        best = max(free, key=lambda s: (common_prefix(s.tokens, tokens), -s.last_used))
        reuse = common_prefix(best.tokens, tokens)
        if reuse < prompt.stable:
            best = min(free, key=lambda s: (bool(s.tokens), s.last_used))
            reuse = common_prefix(best.tokens, tokens)
        cached = [p for p in self.prefixes.entries.values()
                  if isinstance(p.key, tuple) and p.key[0] == "chat" and (p.ready or p.saved is not None)
                  and len(p.tokens) > reuse and tokens[:len(p.tokens)] == p.tokens]
        for prefix in sorted(cached, key=lambda p: -len(p.tokens)):
            if self.prefixes.ensure(prefix, None):
                best = min(free, key=lambda s: (bool(s.tokens), s.last_used))
                assert prefix.seq is not None  # ensure() made it resident
                self.rt.seq_rm(best.seq)
                self.rt.seq_cp(prefix.seq, best.seq)
                best.tokens, reuse = list(prefix.tokens), len(prefix.tokens)
                break
        reuse = min(reuse, len(tokens) - 1)  # evaluate at least one token to get logits
        self.rt.seq_rm(best.seq, reuse, -1)
        best.tokens = best.tokens[:reuse]
        best.busy = True
        return best, reuse

    @staticmethod
    def prefix_key(tokens: list[int]) -> tuple[str, str]:
        return ("chat", hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:24])

    def persona_prefixes(self) -> list[tuple[tuple[str, str], list[int]]]:
        """(key, tokens) of each persona's system turn, as a new conversation in its language starts."""
        out = []
        for lang in self.personas:
            probe = "你好" if lang == "zh" else "hello"
            prompt = self.prompt([ChatMessage("user", probe)], 1)
            stable = prompt.tokens[:prompt.stable]
            out.append((self.prefix_key(stable), stable))
        return out

    def keep_prefix(self, prompt: ChatPrompt, seq: int) -> None:
        """After a prompt is evaluated: keep its stable part as a cached prefix (see module doc)."""
        if prompt.stable < MIN_CACHED_PREFIX:
            return
        stable = prompt.tokens[:prompt.stable]
        key = self.prefix_key(stable)
        existing = self.prefixes.find(key)
        if existing is not None and (existing.seq is not None or existing.saved is not None):
            return
        self._seen[key[1]] += 1
        if prompt.own_system or self._seen[key[1]] >= 2:
            self.prefixes.adopt(key, stable, seq)

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

    def evict_one(self) -> bool:
        idle = [s for s in self.slots if not s.busy and s.tokens]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self.rt.seq_rm(victim.seq)
        victim.tokens = []
        return True

    def remember(self, text: str, tokens: list[int]) -> None:
        self._memo[text] = tokens
        self._memo.move_to_end(text)
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)

    # -- sampling -------------------------------------------------------------------------------
    def sampler(self, p: SamplingParams) -> tuple[llama_cpp.llama_sampler_p, int | None]:
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

    def call_openers(self) -> np.ndarray:
        """Tokens a reply that calls a tool can start with: `<tool_call>` (or its first piece), `{`,
        a Markdown fence. chat.tool_call_bias is added to them at a reply's first token."""
        if self._openers is None:
            def opens(piece: str) -> bool:
                text = piece.lstrip()
                return bool(text) and (CALL_OPEN.startswith(text) or text.startswith((CALL_OPEN, "{"))
                                       or any(f.startswith(text) for f in BARE_OPENERS))
            self._openers = np.array([t for t in range(self.rt.n_vocab)
                                      if opens(self.rt.piece(t).decode("utf-8", "replace"))], dtype=np.int64)
        return self._openers

    def check_template_text(self, tools: ToolSpec, messages: list[ChatMessage]) -> None:
        """Tool definitions and calls are written by the template, tokenized with special tokens:
        a control token in them (e.g. `<|im_start|>` in a description) is refused, never obeyed."""
        texts = [json.dumps(t.definition, ensure_ascii=False) for t in tools.tools]
        texts += [json.dumps(c.arguments, ensure_ascii=False) + c.name for m in messages for c in m.tool_calls]
        for text in texts:
            if any(self.rt.is_end(t) for t in self.rt.tokenize(text, special=True)):
                raise ToolError("tool definitions and tool calls may not contain control tokens such as <|im_start|>")

    def grammar(self, gbnf: str, source: str) -> Grammar:
        """A fresh parse state of `gbnf` (compiled once, then cloned)."""
        compiled = self._grammars.get(gbnf)
        if compiled is None:
            compiled = self._grammars[gbnf] = Grammar(self.rt, gbnf, source)
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.popitem(last=False)[1].close()
        self._grammars.move_to_end(gbnf)
        return compiled.clone()

    def job(self, messages: list[ChatMessage], params: SamplingParams, stats: ChatStats,
            emit: Callable[[str], None], on_end: Callable[["GenerateJob"], None] | None = None,
            fmt: ReplyFormat = ReplyFormat()) -> "GenerateJob":
        """A reply job (checked now: a prompt that cannot fit raises ContextOverflow here)."""
        max_tokens = params.max_tokens or self.defaults.max_tokens
        if fmt.tools is not None:  # argument rules read the client's own system prompt
            system = messages[0].content if messages and messages[0].role == "system" else ""
            users = tuple(m.content for m in messages if m.role == "user")
            tools = replace(fmt.tools, rules=self.rules, system_text=system, user_texts=users)
            if tools.choice == "auto" and tool_rounds(messages) >= self.defaults.tool_rounds:
                tools = replace(tools, choice="none")  # still listed: the prompt, and its prefix, stay the same
            fmt = replace(fmt, tools=tools)
            self.check_template_text(tools, messages)
        prompt = self.prompt(messages, max_tokens, fmt.tools)
        return GenerateJob(self, prompt, params, fmt, stats, emit, on_end,
                           min(max_tokens, self.budget_tokens - len(prompt.tokens)))
