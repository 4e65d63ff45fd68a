"""Tool argument rules (prompts/tools/argument_values.toml): a client that lists what exists in its
system prompt (Home Assistant's exposed devices and areas) gets calls whose arguments are those
values, the target the user named, the numbers and words the user wrote, and the tool that sets a
level the user asked for. Each rule narrows a tool's JSON schema; tools.py compiles the result.
"""
from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.engine.grammar import GrammarError


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
    as_written: tuple[str, ...] = ()              # the first of these whose listed values the user wrote
    # argument -> {word or phrase -> value}: what a `from_message` argument's words mean
    words: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    level_arguments: tuple[str, ...] = ()         # a level the user wrote goes to a tool taking one of these
    level_pattern: re.Pattern | None = None       # how a level is written (30%, 百分之三十), besides `words`
    # an entity's domain in the client's prompt (groups "names", "domain"), and the tool that sets the
    # level of each domain: a level for a named light goes to the light's tool
    entity_pattern: re.Pattern | None = None
    entity_argument: str = ""                     # the `as_written` argument whose values those names are
    level_tool: dict[str, str] = field(default_factory=dict, compare=False)


def load_rules(path: Path) -> ArgumentRules:
    """[[rule]] argument/pattern/separator, [[exclusive]] arguments, [order] first,
    [from_message] arguments and [from_message.words.<argument>] word = value, [as_written] arguments,
    [levels] arguments/pattern/entity_pattern/entity_argument/tool_for_domain."""
    if not path.exists():
        return ArgumentRules()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
        values = tuple(ValueRule(r["argument"], re.compile(r["pattern"], re.MULTILINE), r.get("separator", ""))
                       for r in table.get("rule", []))
        exclusive = tuple(tuple(group["arguments"]) for group in table.get("exclusive", []))
        order = tuple(table.get("order", {}).get("first", []))
        from_message = tuple(table.get("from_message", {}).get("arguments", []))
        words = {arg: {str(w): v for w, v in meanings.items()}
                 for arg, meanings in table.get("from_message", {}).get("words", {}).items()}
        as_written = tuple(table.get("as_written", {}).get("arguments", []))
        levels = table.get("levels", {})
        level_pattern = re.compile(levels["pattern"]) if "pattern" in levels else None
        entity_pattern = re.compile(levels["entity_pattern"], re.MULTILINE) if "entity_pattern" in levels else None
        level_tool = {str(k): str(v) for k, v in levels.get("tool_for_domain", {}).items()}
    except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError, re.error, UnicodeDecodeError) as exc:
        raise GrammarError(f"{path}: {exc}") from None
    unruled = sorted(set(as_written) - {r.argument for r in values})
    if unruled:
        raise GrammarError(f"{path}: [as_written] names {', '.join(unruled)}, which no [[rule]] lists")
    unread = sorted(set(words) - set(from_message))
    if unread:
        raise GrammarError(f"{path}: [from_message.words] has {', '.join(unread)}, which [from_message] does not list")
    if entity_pattern is not None and not {"names", "domain"} <= set(entity_pattern.groupindex):
        raise GrammarError(f"{path}: [levels] entity_pattern needs the groups (?P<names>…) and (?P<domain>…)")
    entity_argument = str(levels.get("entity_argument", ""))
    if entity_pattern is not None and entity_argument not in as_written:
        raise GrammarError(f"{path}: [levels] entity_argument must name the [as_written] argument whose values "
                           f"entity_pattern's names are, not {entity_argument!r}")
    return ArgumentRules(values, exclusive, order, from_message, as_written, words,
                         tuple(levels.get("arguments", [])), level_pattern, entity_pattern, entity_argument,
                         level_tool)


def listed_values(rule: ValueRule, text: str) -> list[str]:
    """The values `text` (a client's system prompt) lists for `rule`, in order, each once."""
    return list(_listed(rule, text))


@functools.lru_cache(maxsize=64)
def _listed(rule: ValueRule, text: str) -> tuple[str, ...]:
    # one request asks for the same values many times (each tool, each render while its prompt is
    # fitted, each grammar): the system prompt is read once per rule
    values: list[str] = []
    for match in rule.pattern.finditer(text):
        found = match.group(1)
        for value in found.split(rule.separator) if rule.separator else [found]:
            value = value.strip().strip("'\"")
            if value and value not in values:
                values.append(value)
    return tuple(values)


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
            # as many items as values: unbounded, the stand-in wrote "light", "switch", … to max_tokens
            most = min(len(values), prop.get("maxItems", len(values)))
            out[rule.argument] = {**prop, "items": {"enum": values}, "maxItems": most}
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


def is_written(value: str, message: str) -> bool:
    """Whether `message` writes `value`, ignoring case: a Latin value as whole words (a plural
    included: "kitchen lights" writes "Kitchen light", "hallway" does not write "Hall"), any other
    (Chinese runs on without spaces) anywhere."""
    if not re.search(r"[A-Za-z0-9]", value):
        return value in message
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?:e?s)?(?![A-Za-z0-9])", message, re.IGNORECASE) is not None


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


def written_values(kind: str, message: str, words: dict[str, Any] | None = None) -> list:
    """The values of JSON type `kind` written in `message`: the values of the `words` it writes
    (half → 50, 红色 → red); numbers also in digits or Chinese numerals; strings, when no words
    are given, as its Latin words (CJK text runs on without spaces: no words)."""
    meant = [value for word, value in (words or {}).items() if is_written(word, message)]
    numerals = [zh_integer(a or b) for a, b in ZH_NUMERAL.findall(message)]
    if kind == "string":
        found: list = meant if words else re.findall(r"[A-Za-zÀ-ÿ]{3,}", message)
        return list(dict.fromkeys(v for v in found if isinstance(v, str)))
    if kind == "integer":
        found = [int(v) for v in re.findall(r"(?<![\d.])\d{1,6}(?![\d.])", message)] + numerals
    elif kind == "number":
        found = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", message)] + [float(n) for n in numerals]
    else:
        return []
    found += [v for v in meant if isinstance(v, int | float) and not isinstance(v, bool)]
    return list(dict.fromkeys(int(v) if kind == "integer" else v for v in found))


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
        values = written_values(str(prop.get("type")), message, rules.words.get(name))
        if values:
            out[name] = {**prop, "enum": values}
        elif name not in required:
            out.pop(name)
    return {**schema, "properties": out}


def written_target(rules: ArgumentRules, system_text: str, user_texts: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(argument, values): the first `as_written` argument whose listed values the user wrote, and
    those values, read in the latest message first, then the earlier ones ("turn it off again");
    None when the user wrote none (a Chinese request in a home listed in English, "turn it off")."""
    listed = {r.argument: listed_values(r, system_text) for r in rules.values if r.argument in rules.as_written}
    for message in reversed(user_texts):
        for argument in rules.as_written:
            written = [v for v in listed.get(argument, []) if is_written(v, message)]
            if written:
                return argument, written
    return None


def _as_written(schema: dict, rules: ArgumentRules, target: tuple[str, list[str]] | None) -> dict:
    """The call's target as the user named it: the argument of `target` limited to the values the
    user wrote and required (the stand-in skipped a name it was told, to write only a domain), the
    other `as_written` arguments left out (unless the tool requires them)."""
    props = schema.get("properties")
    if target is None or not isinstance(props, dict) or target[0] not in props:
        return schema
    argument, written = target
    prop = props[argument]
    is_list = prop.get("type") == "array"
    allowed = (prop.get("items") or {}).get("enum") if is_list else prop.get("enum")
    values = [v for v in written if allowed is None or v in allowed]
    if not values:
        return schema
    required = set(schema.get("required") or [])
    out = {k: v for k, v in props.items() if k == argument or k not in rules.as_written or k in required}
    narrowed = {"items": {"enum": values}, "maxItems": len(values)} if is_list else {"enum": values}
    out[argument] = {**prop, **narrowed}
    return {**schema, "properties": out, "required": [*(schema.get("required") or []), *({argument} - required)]}


def arguments_schema(parameters: dict, rules: ArgumentRules, system_text: str,
                     target: tuple[str, list[str]] | None = None, message: str = "") -> dict:
    """A tool's arguments schema (`parameters`) under the rules, for a request with this system
    prompt, the target the user named (`written_target`, found once per request) and the user's
    latest `message`."""
    narrowed = _narrow_values(parameters, rules, system_text)
    narrowed = _as_written(narrowed, rules, target)
    narrowed = _from_message(narrowed, rules, message)
    return _exclusive(narrowed, rules)


def sets_a_level(rules: ArgumentRules, message: str) -> bool:
    """Whether `message` writes a level (`[levels]`: "30%", 百分之三十, or a word of a level
    argument's `words`, such as 最亮)."""
    if rules.level_pattern is not None and rules.level_pattern.search(message):
        return True
    return any(is_written(word, message) for arg in rules.level_arguments for word in rules.words.get(arg, {}))


def takes(parameters: dict, arguments: tuple[str, ...]) -> bool:
    """Whether a tool with these parameters takes any of `arguments`."""
    props = parameters.get("properties")
    return isinstance(props, dict) and any(a in props for a in arguments)


def level_tool_names(rules: ArgumentRules, system_text: str, message: str,
                     target: tuple[str, list[str]] | None) -> set[str] | None:
    """None when the user's latest `message` sets no level; else the tools `[levels] tool_for_domain`
    gives the domains of the devices the user named (`target`; empty when they named none)."""
    if not rules.level_arguments or not sets_a_level(rules, message):
        return None
    if target is None or target[0] != rules.entity_argument or rules.entity_pattern is None:
        return set()
    domains = {m["domain"].strip() for m in rules.entity_pattern.finditer(system_text)
               if set(target[1]) & {n.strip() for n in m["names"].split(",")}}
    return {rules.level_tool[d] for d in domains if d in rules.level_tool}
