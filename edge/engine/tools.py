"""Tool calls: how tools reach the model, how its calls are constrained, how they are read back.

The format is Qwen2.5's (the "Hermes" format Qwen models are trained on): the system turn lists the
tools as JSON lines inside <tools></tools>, a call is
    <tool_call>
    {"name": "<tool name>", "arguments": {<arguments>}}
    </tool_call>
and a tool's result comes back in a user turn inside <tool_response></tool_response>. A model whose
chat template knows tools (Qwen2.5's does) gets them through its own template; for one whose
template has no tool syntax (Qwen1.5's ChatML), `render_fallback` writes the same text into the
messages (README: "Tool calls").

What the model writes after `<tool_call>` is constrained by a grammar built from the tools' JSON
schemas (llama.cpp's converter): the name is one of the given tools and the arguments validate
against that tool's schema, by construction. The argument rules (tool_rules.py,
prompts/tools/argument_values.toml) narrow each tool's schema further for a client that lists its
devices in its prompt (Home Assistant).
"""
from __future__ import annotations

import json
import re
import tomllib
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge.engine.grammar import GrammarError, SchemaUnsupported, gbnf_literal, schema_gbnf
from edge.engine.tool_rules import (
    ArgumentRules,
    arguments_schema,
    level_tool_names,
    listed_values,
    takes,
    written_target,
)
from edge.engine.types import ChatMessage, ToolCall

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_PARALLEL_CALLS = 4
CHOICES = ("auto", "none", "required")
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")


class ToolError(ValueError):
    """Tools or a tool choice the request cannot use (a 400 for the client)."""


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict          # JSON schema of the arguments
    definition: dict          # as the client sent it, shown to the model


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[Tool, ...]
    choice: str = "auto"      # auto | none | required | the name of one tool
    parallel: bool = True
    rules: ArgumentRules = ArgumentRules()
    system_text: str = ""     # the client's system prompt, where the rules look
    user_texts: tuple[str, ...] = ()  # the user's messages, oldest first, where the user's own words are read

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")


def parse_tools(raw: list[Any] | None, choice: Any = None, parallel: bool | None = None) -> ToolSpec | None:
    """OpenAI / Ollama `tools` and `tool_choice` as a ToolSpec (None without tools); ToolError
    with a message for the client when they cannot be used."""
    if not raw:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools")
        return None
    tools = []
    for i, entry in enumerate(raw):
        fn = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(fn, dict) or entry.get("type", "function") != "function":
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append(Tool(name, params, {"type": "function", "function": fn}))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolError("two tools have the same name")
    return ToolSpec(tuple(tools), _choice(choice, names), parallel if parallel is not None else True)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolError(f"tool_choice must be one of {', '.join(CHOICES)} or a function")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name not in names:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    return name


@dataclass(frozen=True)
class ToolRouting:
    """prompts/tools/routing.toml: a label task reads the user's latest message before the reply,
    and its label sets the tool choice (a small model tells "turn it off" from "is it off?" far
    better as a label of its own than inside a long client prompt)."""
    task: str                        # a label task of prompts/tasks/
    when_tools: tuple[str, ...]      # only requests that offer all of these tools are routed
    choices: dict[str, str]          # label -> auto | none | required | a tool's name
    min_probability: float = 0.0     # a label the task is less sure of routes nowhere (auto)


def load_routing(path: Path, labels_of: dict[str, list[str]]) -> ToolRouting | None:
    """The routing file (None without it); `labels_of` maps each label task to its labels."""
    if not path.exists():
        return None
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
        routing = ToolRouting(table["task"], tuple(table["when_tools"]), dict(table["choice"]),
                              float(table.get("min_probability", 0.0)))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise GrammarError(f"{path}: {exc}") from None
    if routing.task not in labels_of:
        raise GrammarError(f"{path}: task {routing.task!r} is not a label task in prompts/tasks/")
    unknown = sorted(set(routing.choices) - set(labels_of[routing.task]))
    if unknown:
        raise GrammarError(f"{path}: {', '.join(unknown)} not among the labels of {routing.task!r}")
    if not routing.when_tools or not all(isinstance(c, str) for c in routing.choices.values()):
        raise GrammarError(f"{path}: when_tools must list tools and each choice must be a string")
    return routing


def routed_message(routing: ToolRouting | None, spec: ToolSpec | None, messages: list[ChatMessage]) -> str | None:
    """The message the routing task is to read: the user's latest one, when `routing` applies to a
    reply with `spec` after `messages` (tool choice auto, every tool of when_tools offered, the
    user has the last word: after a tool result the reply is the model's own); None otherwise."""
    if routing is None or spec is None or spec.choice != "auto" or not messages or messages[-1].role != "user":
        return None
    offered = {t.name for t in spec.tools}
    message = messages[-1].content
    return message if message.strip() and all(name in offered for name in routing.when_tools) else None


def routed(spec: ToolSpec, routing: ToolRouting, label: str | None, probability: float | None) -> ToolSpec:
    """`spec` with the tool choice the label routes to (unchanged for a label without a choice, one
    below min_probability, or one naming a tool the request does not offer)."""
    sure = probability is not None and probability >= routing.min_probability
    choice = routing.choices.get(label or "") if sure else None
    if choice is None or (choice not in CHOICES and choice not in {t.name for t in spec.tools}):
        return spec
    return replace(spec, choice=choice)


def applicable(spec: ToolSpec) -> ArgumentRules:
    """The rules, when the client's prompt lists values for any value rule (it is a prompt of that
    kind); no rules otherwise."""
    lists = any(listed_values(r, spec.system_text) for r in spec.rules.values)
    return spec.rules if lists else ArgumentRules()


# -- grammar --------------------------------------------------------------------------------------

def shown_definitions(spec: ToolSpec) -> list[dict]:
    """The tools as the model is shown them: the client's definitions, with the properties the
    order rule names listed first, in that order. A small model writes arguments in the order it
    was shown them (Home Assistant lists a light's colour and temperature before its brightness),
    and the grammar has them in the rule's order, so the two must agree."""
    first = applicable(spec).order
    if not first:
        return [t.definition for t in spec.tools]
    shown = []
    for tool in spec.tools:
        fn = tool.definition["function"]
        props = (fn.get("parameters") or {}).get("properties")
        if isinstance(props, dict):
            ordered = {k: props[k] for k in first if k in props} | props
            fn = {**fn, "parameters": {**fn["parameters"], "properties": ordered}}
        shown.append({**tool.definition, "function": fn})
    return shown


def _level_tools(tools: list[Tool], rules: ArgumentRules, chosen: set[str] | None) -> list[Tool]:
    """The tools a level the user wrote can go to (`chosen`: level_tool_names): the level tool of the
    named devices' domains, else every tool taking a level argument; all of `tools` without a level
    or when none of them fits."""
    if chosen is None:
        return tools
    takers = [t for t in tools if takes(t.parameters, rules.level_arguments)]
    return [t for t in takers if t.name in chosen] or takers or tools


def call_schema(spec: ToolSpec) -> dict:
    """The JSON schema of one call: {"name": <a tool>, "arguments": <its arguments>}; a level the
    user's latest message writes goes to a tool that takes a level argument, when one is offered."""
    tools = [t for t in spec.tools if spec.choice in CHOICES or t.name == spec.choice]
    rules = applicable(spec)
    target = written_target(rules, spec.system_text, spec.user_texts)
    message = spec.user_texts[-1] if spec.user_texts else ""
    tools = _level_tools(tools, rules, level_tool_names(rules, spec.system_text, message, target))
    return {"anyOf": [{"type": "object", "properties": {
        "name": {"const": t.name},
        "arguments": arguments_schema(t.parameters, rules, spec.system_text, target, message)},
        "required": ["name", "arguments"]} for t in tools]}


CALL_STARTS = ("forced", "opened", "bare")


def call_gbnf(spec: ToolSpec, start: str) -> str:
    """GBNF of the calls, from where the reply stands:
    - forced: nothing written yet, a call must come (tool_choice required or named);
    - opened: the model wrote `<tool_call>` (it chose to call);
    - bare: the model opened a reply with `{`, a call without its tags: one call."""
    try:
        body = schema_gbnf(call_schema(spec), "tools", prop_order=("name", "arguments", *applicable(spec).order))
    except SchemaUnsupported as exc:
        raise ToolError(f"a tool's parameters cannot be enforced: {exc}") from None
    body = re.sub(r"^root ::=", "call-json ::=", body, count=1, flags=re.MULTILINE)
    ws = "[ \\n]{0,2}"
    one = f"{ws} call-json {ws} {gbnf_literal(CALL_CLOSE)}"
    more = f'("\\n" {gbnf_literal(CALL_OPEN)} {one}){{0,{MAX_PARALLEL_CALLS - 1 if spec.parallel else 0}}}'
    roots = {"forced": f"{gbnf_literal(CALL_OPEN)} {one} {more}", "opened": f"{one} {more}",
             "bare": f"{ws} call-json"}
    return f"root ::= {roots[start]}\n{body}"


def parse_calls(text: str) -> list[ToolCall]:
    """The complete calls in `text` (from `<tool_call>` or a bare `{` on), in order; a call cut
    short by the length limit is dropped."""
    calls = []
    for chunk in text.split(CALL_OPEN):
        body = chunk.partition(CALL_CLOSE)[0].strip()
        if not body:
            continue
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            continue  # cut short (the grammar allows nothing else)
        calls.append(ToolCall(value["name"], value.get("arguments") or {}, f"call_{uuid.uuid4().hex[:24]}"))
    return calls


# -- rendering without template support -------------------------------------------------------------

def tools_block(spec: ToolSpec) -> str:
    lines = "".join("\n" + json.dumps(d, ensure_ascii=False) for d in shown_definitions(spec))
    return f"{TOOLS_HEADER}{lines}{TOOLS_FOOTER}"


def call_text(call: ToolCall) -> str:
    payload = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{payload}\n{CALL_CLOSE}"


def render_fallback(messages: list[ChatMessage], spec: ToolSpec | None) -> list[ChatMessage]:
    """Messages carrying tools, calls and results as text, for a template with no tool syntax."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                out[-1] = ChatMessage("user", out[-1].content + "\n" + block)
            else:
                out.append(ChatMessage("user", block))
        elif m.role == "assistant" and m.tool_calls:
            text = "\n".join([m.content] * bool(m.content) + [call_text(c) for c in m.tool_calls])
            out.append(ChatMessage("assistant", text))
        else:
            out.append(m)
    if spec is not None and spec.tools:
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", out[0].content + "\n\n" + tools_block(spec))
        else:
            out.insert(0, ChatMessage("system", tools_block(spec)))
    return out


@dataclass
class CallWatch:
    """Watches generated text for `<tool_call>`: text that may be its beginning is held back from
    the client until it is known not to be."""
    held: str = ""
    opened: bool = False
    overshoot: str = ""   # what the piece that completed the trigger wrote past it

    def feed(self, piece: str) -> str:
        """The part of `piece` that is reply text for sure; sets `opened` on the trigger."""
        text = self.held + piece
        at = text.find(CALL_OPEN)
        if at >= 0:
            self.opened, self.held = True, ""
            self.overshoot = text[at + len(CALL_OPEN):]
            return text[:at]
        keep = next((n for n in range(min(len(text), len(CALL_OPEN) - 1), 0, -1)
                     if CALL_OPEN.startswith(text[-n:])), 0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
