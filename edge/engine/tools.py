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
against that tool's schema, by construction. The argument rules (prompts/tools/argument_values.toml)
narrows string arguments to values the client listed in its system prompt (the names and areas of
the devices Home Assistant exposes), keeps arguments apart that its instructions say not to combine,
and orders them.
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
class ValueRule:
    """A string argument narrowed to the values a client lists in its system prompt."""
    argument: str             # property name, in any tool whose schema has it as a string
    pattern: re.Pattern       # one match per listed value; group 1 is the value (or a list of them)
    separator: str = ""       # when group 1 lists several values


@dataclass(frozen=True)
class ArgumentRules:
    """prompts/tools/argument_values.toml: how a client that lists what exists in its prompt
    (Home Assistant) narrows tool arguments. They apply to a request only when its system prompt
    lists values for at least one value rule."""
    values: tuple[ValueRule, ...] = ()
    exclusive: tuple[tuple[str, ...], ...] = ()   # at most one argument of each group in a call
    order: tuple[str, ...] = ()                   # these arguments are written first, in this order
    from_message: tuple[str, ...] = ()            # values only as written in the user's latest message


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[Tool, ...]
    choice: str = "auto"      # auto | none | required | the name of one tool
    parallel: bool = True
    rules: ArgumentRules = ArgumentRules()
    system_text: str = ""     # the client's system prompt, where the rules look
    user_text: str = ""       # the user's latest message, where `from_message` values come from

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


# -- argument rules -------------------------------------------------------------------------------

def load_rules(path: Path) -> ArgumentRules:
    """[[rule]] argument/pattern/separator, [[exclusive]] arguments, [order] first,
    [from_message] arguments."""
    if not path.exists():
        return ArgumentRules()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
        values = tuple(ValueRule(r["argument"], re.compile(r["pattern"], re.MULTILINE), r.get("separator", ""))
                       for r in table.get("rule", []))
        exclusive = tuple(tuple(group["arguments"]) for group in table.get("exclusive", []))
        order = tuple(table.get("order", {}).get("first", []))
        from_message = tuple(table.get("from_message", {}).get("arguments", []))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, re.error, UnicodeDecodeError) as exc:
        raise GrammarError(f"{path}: {exc}") from None
    return ArgumentRules(values, exclusive, order, from_message)


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


def listed_values(rule: ValueRule, text: str) -> list[str]:
    values: list[str] = []
    for match in rule.pattern.finditer(text):
        found = match.group(1)
        for value in found.split(rule.separator) if rule.separator else [found]:
            value = value.strip().strip("'\"")
            if value and value not in values:
                values.append(value)
    return values


def applicable(spec: ToolSpec) -> ArgumentRules:
    """The rules, when the client's prompt lists values for any value rule (it is a prompt of that
    kind); no rules otherwise."""
    lists = any(listed_values(r, spec.system_text) for r in spec.rules.values)
    return spec.rules if lists else ArgumentRules()


def _narrow_values(schema: dict, rules: ArgumentRules, text: str) -> dict:
    """Each ruled string argument (or list of strings) limited to the values the client listed; a
    ruled argument it listed no value for is left out (unless required): in a prompt that lists
    what exists, a value it does not list cannot be right."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return schema
    required = set(schema.get("required") or [])
    out = dict(props)
    for rule in rules.values:
        prop = props.get(rule.argument)
        if not isinstance(prop, dict) or "enum" in prop or "const" in prop:
            continue
        values = listed_values(rule, text)
        if not values and rule.argument not in required:
            out.pop(rule.argument)
        elif values and prop.get("type") == "string":
            out[rule.argument] = {**prop, "enum": values}
        elif values and prop.get("type") == "array" and not prop.get("items"):
            out[rule.argument] = {**prop, "items": {"enum": values}}
    return {**schema, "properties": out}


def _exclusive(schema: dict, rules: ArgumentRules) -> dict:
    """An arguments schema where each exclusive group's arguments cannot come together: one
    alternative per member, without the group's other members."""
    props = schema.get("properties") or {}
    for group in rules.exclusive:
        present = [a for a in group if a in props and a not in set(schema.get("required") or [])]
        if len(present) < 2:
            continue
        variants = [{**schema, "properties": {k: v for k, v in props.items() if k == keep or k not in present}}
                    for keep in present]
        return {"anyOf": [_exclusive(v, rules) for v in variants]}
    return schema


ZH_DIGITS = {c: i for i, c in enumerate("零一二三四五六七八九")} | {"两": 2}
# 百分之N is N percent; otherwise two characters at least: 一点 (a little), 一下 (once) are no numbers
ZH_NUMERAL = re.compile("百分之([零一二两三四五六七八九十百]+)|([零一二两三四五六七八九十百]{2,})")


def zh_integer(numeral: str) -> int:
    """The value of a Chinese numeral below 1000: 八十 80, 十五 15, 一百零五 105."""
    total = digit = 0
    for ch in numeral:
        if ch in ZH_DIGITS:
            digit = ZH_DIGITS[ch]
        else:
            total += (digit or 1) * (10 if ch == "十" else 100)
            digit = 0
    return total + digit


def written_values(kind: str, message: str) -> list:
    """The values of JSON type `kind` written in `message`: numbers in digits or in Chinese
    numerals, strings as Latin words (CJK text runs on without spaces: no words)."""
    numerals = [zh_integer(a or b) for a, b in ZH_NUMERAL.findall(message)]
    if kind == "string":
        found: list = re.findall(r"[A-Za-zÀ-ÿ]{3,}", message)
    elif kind == "integer":
        found = [int(v) for v in re.findall(r"(?<![\d.])\d{1,6}(?![\d.])", message)] + numerals
    elif kind == "number":
        found = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", message)] + [float(n) for n in numerals]
    else:
        return []
    return list(dict.fromkeys(found))


def _from_message(schema: dict, rules: ArgumentRules, message: str) -> dict:
    """Each `from_message` argument limited to the values of its type written in `message`
    (`written_values`); left out, unless required, when the message writes none: a brightness the
    user did not say cannot be right."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not rules.from_message:
        return schema
    required = set(schema.get("required") or [])
    out = dict(props)
    for name in rules.from_message:
        prop = props.get(name)
        if not isinstance(prop, dict) or "enum" in prop or "const" in prop:
            continue
        values = written_values(str(prop.get("type")), message)
        if values:
            out[name] = {**prop, "enum": values}
        elif name not in required:
            out.pop(name)
    return {**schema, "properties": out}


def arguments_schema(tool: Tool, rules: ArgumentRules, text: str, message: str = "") -> dict:
    narrowed = _from_message(_narrow_values(tool.parameters, rules, text), rules, message)
    return _exclusive(narrowed, rules)


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


def call_schema(spec: ToolSpec) -> dict:
    """The JSON schema of one call: {"name": <a tool>, "arguments": <its arguments>}."""
    tools = [t for t in spec.tools if spec.choice in CHOICES or t.name == spec.choice]
    rules = applicable(spec)
    return {"anyOf": [{"type": "object", "properties": {
        "name": {"const": t.name},
        "arguments": arguments_schema(t, rules, spec.system_text, spec.user_text)},
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
