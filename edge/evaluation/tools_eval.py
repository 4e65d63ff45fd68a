"""`qwen-edge eval tools`: does the model call the right Home Assistant tool with the right arguments?

Each case (tests/data/tools_eval/cases.jsonl) is a conversation in one home; the home's file holds
Home Assistant's own system prompt and tools, recorded from HA. The engine answers the way the
daemon would (same prompt building, same grammar), and each answer is scored:
- decision: a call when one is expected, text when not;
- tool name: the expected tool (cases that expect a call);
- arguments: the call selects the same entities as the expected arguments in that home (a name
  matches an entity's name or alias, case and surrounding spaces aside; an area selects its
  entities; a domain keeps its entities), every other expected value is equal (50 and "50" alike,
  as HA coerces), and no argument the user did not ask for is added (floor, device_class, color,
  temperature) — the labelling guide in tests/data/tools_eval/README.md;
- invalid: a call to an unknown tool, or arguments that do not validate against the tool's JSON
  schema (checked with `jsonschema`, independently of the grammar that should rule it out).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from edge.engine.engine import Engine
from edge.engine.reply import ReplyFormat
from edge.engine.tools import ToolSpec, parse_tools
from edge.engine.types import ChatMessage, ChatStats, SamplingParams, ToolCall
from edge.evaluation.datasets import SPLITS, DatasetError, in_tune_split, read_jsonl
from edge.evaluation.metrics import percentiles

TARGET_KEYS = ("name", "area", "domain")
UNASKED_KEYS = ("floor", "device_class", "color", "temperature")  # wrong unless the case expects them
Progress = Callable[[int, int], None]


class ToolsDataError(DatasetError):
    """The cases or homes cannot be read; the message names the file."""


@dataclass(frozen=True)
class Home:
    id: str
    system_prompt: str
    tools: list[dict]
    entities: list[dict]


@dataclass(frozen=True)
class Case:
    id: str
    lang: str
    category: str
    home: str
    messages: list[ChatMessage]
    expect: dict


@dataclass
class Outcome:
    case: Case
    calls: list[ToolCall]
    text: str
    latency_ms: float
    ttft_ms: float
    finish: str
    invalid: list[str] = field(default_factory=list)
    decision_ok: bool = False
    name_ok: bool | None = None
    args_ok: bool | None = None


def _message(raw: dict) -> ChatMessage:
    calls = tuple(ToolCall(c["function"]["name"], c["function"].get("arguments") or {})
                  for c in raw.get("tool_calls") or [])
    return ChatMessage(raw["role"], raw.get("content") or "", calls)


def load_homes(folder: Path) -> dict[str, Home]:
    homes = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rec = data["recorded"]
            homes[data["id"]] = Home(data["id"], rec["system_prompt"], rec["tools"], data["home"]["entities"])
        except (OSError, ValueError, KeyError) as exc:
            raise ToolsDataError(f"{path}: not a recorded home ({exc})") from None
    if not homes:
        raise ToolsDataError(f"no homes in {folder}")
    return homes


def load_cases(path: Path, homes: dict[str, Home], split: str = "all") -> list[Case]:
    """The cases of one split: 'tune' is the ~30 % chosen by a hash of their id
    (datasets.in_tune_split), on which argument rules and routing are tried; 'heldout' is the rest."""
    if split not in SPLITS:
        raise ToolsDataError(f"unknown split {split!r} (use one of {SPLITS})")
    rows = read_jsonl(path, lambda raw: Case(raw["id"], raw["lang"], raw["category"], raw["home"],
                                             [_message(m) for m in raw["messages"]], raw["expect"]),
                      '{"id", "lang", "category", "home", "messages", "expect"}')
    for n, case in rows:
        if case.home not in homes:
            raise ToolsDataError(f"{path}:{n}: unknown home {case.home!r}")
    cases = [case for _, case in rows if split == "all" or in_tune_split(case.id) == (split == "tune")]
    if not cases:
        raise ToolsDataError(f"{path}: no cases in split {split!r}")
    return cases


# -- scoring ------------------------------------------------------------------------------------

def _norm(value: object) -> str:
    return str(value).strip().casefold()


def targets(args: dict, home: Home) -> frozenset[str] | None:
    """The entities `args` select in `home`; None when they name no target."""
    if not any(args.get(k) for k in TARGET_KEYS):
        return None
    chosen = home.entities
    if args.get("name"):
        chosen = [e for e in chosen if _norm(args["name"]) in {_norm(e["name"]), *map(_norm, e.get("aliases", []))}]
    if args.get("area"):
        chosen = [e for e in chosen if _norm(e.get("area", "")) == _norm(args["area"])]
    domains = args.get("domain")
    if domains:
        wanted = {_norm(d) for d in (domains if isinstance(domains, list) else [domains])}
        chosen = [e for e in chosen if _norm(e["kind"]) in wanted]
    return frozenset(e["id"] for e in chosen)


def arguments_ok(got: dict, expected: dict, home: Home) -> bool:
    if targets(got, home) != targets(expected, home):
        return False
    for key, value in expected.items():
        if key not in TARGET_KEYS and _norm(got.get(key)) != _norm(value):
            return False
    return not any(k in got and k not in expected for k in UNASKED_KEYS)


def invalid_calls(calls: list[ToolCall], spec: ToolSpec) -> list[str]:
    schemas = {t.name: t.parameters for t in spec.tools}
    problems = []
    for call in calls:
        if call.name not in schemas:
            problems.append(f"unknown tool {call.name!r}")
            continue
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as exc:
            problems.append(f"{call.name}: {exc.message}")
    return problems


def score(outcome: Outcome, home: Home) -> Outcome:
    expect = outcome.case.expect
    called = bool(outcome.calls)
    outcome.decision_ok = called == bool(expect.get("call"))
    if expect.get("call"):
        first = outcome.calls[0] if called else None
        outcome.name_ok = first is not None and first.name == expect.get("name")
        outcome.args_ok = (first is not None and bool(outcome.name_ok)
                           and arguments_ok(first.arguments, expect.get("arguments") or {}, home))
    return outcome


# -- running ------------------------------------------------------------------------------------

def run_case(engine: Engine, case: Case, home: Home, params: SamplingParams) -> Outcome:
    spec = parse_tools(home.tools)
    assert spec is not None, "a recorded home offers tools"
    messages = [ChatMessage("system", home.system_prompt), *case.messages]
    stats = ChatStats()
    t0 = time.perf_counter()
    fmt = engine.route(messages, ReplyFormat(tools=spec))
    text = "".join(engine.chat_stream(messages, params, stats, fmt))
    outcome = Outcome(case, list(stats.tool_calls), text, (time.perf_counter() - t0) * 1000, stats.ttft_ms,
                      stats.finish_reason)
    outcome.invalid = invalid_calls(outcome.calls, spec)
    return score(outcome, home)


def _rate(values: Sequence[bool | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return round(sum(scored) / len(scored), 4) if scored else None


def summary(outcomes: Sequence[Outcome]) -> dict:
    commands = [o for o in outcomes if o.case.expect.get("call")]
    chit = [o for o in outcomes if o.case.category == "chitchat"]
    return {"n": len(outcomes), "commands": len(commands),
            "decision_accuracy": _rate([o.decision_ok for o in outcomes]),
            "tool_name_accuracy": _rate([o.name_ok for o in commands]),
            "argument_accuracy": _rate([o.args_ok for o in commands]),
            "chitchat_in_text": _rate([not o.calls for o in chit]),
            "invalid_outputs": sum(1 for o in outcomes if o.invalid),
            **{f"latency_{k}": v for k, v in percentiles([o.latency_ms for o in outcomes]).items()},
            "ttft_p50_ms": percentiles([o.ttft_ms for o in outcomes])["p50_ms"]}


def report(outcomes: Sequence[Outcome]) -> dict:
    by_lang = {lang: summary([o for o in outcomes if o.case.lang == lang])
               for lang in sorted({o.case.lang for o in outcomes})}
    by_category = {cat: _rate([o.decision_ok and o.args_ok is not False for o in outcomes if o.case.category == cat])
                   for cat in sorted({o.case.category for o in outcomes})}
    misses = [{"id": o.case.id, "calls": [{"name": c.name, "arguments": c.arguments} for c in o.calls],
               "text": o.text[:160], "invalid": o.invalid}
              for o in outcomes if not o.decision_ok or o.args_ok is False or o.invalid]
    return {"all": summary(outcomes), "by_language": by_lang, "by_category": by_category, "misses": misses}


def evaluate(engine: Engine, cases: Sequence[Case], homes: dict[str, Home], params: SamplingParams,
             progress: Progress | None = None) -> dict[str, Any]:
    outcomes = []
    for i, case in enumerate(cases):
        outcomes.append(run_case(engine, case, homes[case.home], params))
        if progress:
            progress(i + 1, len(cases))
    return report(outcomes)
