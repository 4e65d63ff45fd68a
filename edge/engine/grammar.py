"""Grammars, the contract of every constrained output: label sets, JSON schemas, tool calls.

A grammar is GBNF, compiled by llama.cpp. JSON schemas are turned into GBNF by llama.cpp's own
converter (the port shipped in llama-cpp-python, `llama_cpp.llama_grammar.SchemaConverter`); we
only check, before converting, that the schema uses nothing the converter would silently ignore,
so a schema feature it cannot express is refused with a message naming it instead of producing
output that does not validate.

`Grammar` is one llama.cpp grammar sampler with its parse state. Picking the best allowed token
looks at the best-scoring few tokens first and applies the grammar to the whole vocabulary only
when none of them is allowed: the same choice as masking everything, at a fraction of the cost.
"""
from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import SchemaConverter

from edge.engine.runtime import TOKEN_DATA, LlamaRuntime


class GrammarError(ValueError):
    """A grammar or schema that cannot be used; the message names its source."""


class SchemaUnsupported(GrammarError):
    """A JSON schema asks for something the grammar converter cannot enforce."""


# Keywords the converter enforces (llama_grammar.SchemaConverter.visit and _build_object_rule).
ENFORCED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "format", "minLength", "maxLength",
})
# Keywords that only annotate or hold definitions: ignoring them changes nothing about validity.
ANNOTATION_KEYWORDS = frozenset({
    "title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly",
    "writeOnly", "$defs", "definitions", "strict",
})
STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# A bounded integer range becomes an enum of its values (the converter has no numeric bounds);
# wider ranges are refused rather than enforced loosely.
MAX_ENUMERATED_RANGE = 1000
# JSON strings may not hold raw control characters; the converter's `char` rule allows them, which
# would make `json.loads` fail on the output. llama.cpp's C++ converter excludes them; so do we.
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)
_STRICT_CHAR_RULE = (r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
                     r'[0-9a-fA-F])')
_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    return '"' + "".join(_GBNF_ESCAPES.get(ch, ch) for ch in text) + '"'


def label_gbnf(displays: list[str]) -> str:
    """A grammar allowing exactly one of `displays`."""
    return "root ::= " + " | ".join(gbnf_literal(d) for d in displays)


# -- JSON schemas ---------------------------------------------------------------------------------

def _integer_range(schema: Mapping[str, Any], where: str) -> dict | None:
    """An enum standing for a bounded integer range, or None when the schema has no bounds."""
    bounds = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema}
    if not bounds:
        return None
    if schema.get("type") != "integer" or not all(isinstance(v, (int, float)) for v in bounds.values()):
        raise SchemaUnsupported(f"{where}: numeric bounds ({', '.join(sorted(bounds))}) are supported only on "
                                "integers with a lower and an upper bound")
    low = bounds.get("minimum", bounds.get("exclusiveMinimum", None))
    high = bounds.get("maximum", bounds.get("exclusiveMaximum", None))
    if low is None or high is None:
        raise SchemaUnsupported(f"{where}: an integer needs both a lower and an upper bound to be enforced "
                                f"(got only {', '.join(sorted(bounds))})")
    first = int(np.ceil(low)) + (1 if "exclusiveMinimum" in bounds and float(low).is_integer() else 0)
    last = int(np.floor(high)) - (1 if "exclusiveMaximum" in bounds and float(high).is_integer() else 0)
    if last - first + 1 > MAX_ENUMERATED_RANGE or last < first:
        raise SchemaUnsupported(f"{where}: integer range {low}..{high} is too wide to enforce "
                                f"(at most {MAX_ENUMERATED_RANGE} values)")
    return {"enum": list(range(first, last + 1))}


def _children(schema: Mapping[str, Any]) -> Iterator[tuple[str, str, str | int | None, Any]]:
    """(label for messages, container key, name or index within it or None, sub-schema)."""
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            yield f"{key}.{name}", key, name, sub
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield f"{key}[{i}]", key, i, sub
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield key, key, None, schema[key]


def _check_keywords(out: dict, where: str) -> None:
    """Every keyword of one schema level is one the converter enforces (or an annotation)."""
    unknown = sorted(set(out) - ENFORCED_KEYWORDS - ANNOTATION_KEYWORDS)
    if unknown:
        raise SchemaUnsupported(f"{where}: keyword {unknown[0]!r} is not supported by the grammar compiler")
    types = out.get("type", [])
    for t in types if isinstance(types, list) else [types]:
        if t not in SCHEMA_TYPES:
            raise SchemaUnsupported(f"{where}: unknown type {t!r}")
    if "format" in out and out["format"] not in STRING_FORMATS:
        raise SchemaUnsupported(f"{where}: string format {out['format']!r} is not supported by the grammar compiler")
    if isinstance(out.get("$ref"), str) and not out["$ref"].startswith("#/"):
        raise SchemaUnsupported(f"{where}: only local references ('#/...') are supported, not {out['$ref']!r}")
    pattern = str(out.get("pattern", "^$"))
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise SchemaUnsupported(f"{where}: a pattern must be anchored with ^ and $")


def normalise_schema(schema: Any, where: str = "$") -> Any:
    """A copy of `schema` the converter enforces exactly, or SchemaUnsupported naming what it cannot."""
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise SchemaUnsupported(f"{where}: " + ("the schema `false` allows nothing" if schema is False
                                                else "a schema must be a JSON object"))
    out = {k: v for k, v in schema.items() if k not in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
    ranged = _integer_range(schema, where)
    if ranged is not None:
        out.pop("type")
        out.update(ranged)
    _check_keywords(out, where)
    for label, key, member, sub in _children(schema):
        replaced = normalise_schema(sub, f"{where}.{label}")
        if member is None:
            out[key] = replaced
        elif isinstance(member, int):
            out[key] = [*out[key][:member], replaced, *out[key][member + 1:]]
        else:
            out[key] = {**out[key], member: replaced}
    return out


def schema_gbnf(schema: Any, where: str = "schema", prop_order: tuple[str, ...] = ()) -> str:
    """GBNF for JSON matching `schema`, objects' properties in schema order (those named in
    `prop_order` first); SchemaUnsupported (naming the part) when it cannot be enforced."""
    try:
        normal = normalise_schema(schema, "$")
    except SchemaUnsupported as exc:
        raise SchemaUnsupported(f"{where}: {exc}") from None
    order: dict[str, int] = {}
    for i, name in enumerate(prop_order):
        order.setdefault(name, i)  # a name listed twice keeps its first place
    converter = SchemaConverter(prop_order=order, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(normal, "input")
        converter.visit(resolved, "")
        text = converter.format_grammar()
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SchemaUnsupported(f"{where}: {exc}") from None
    return _CHAR_RULE.sub(lambda _m: _STRICT_CHAR_RULE, text)


JSON_OBJECT_GBNF = schema_gbnf({"type": "object"})  # Ollama `format: "json"`, OpenAI `json_object`


def load_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GrammarError(f"schema file missing: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrammarError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"{path}: a schema must be a JSON object")
    return schema


# -- the sampler ------------------------------------------------------------------------------------

class Grammar:
    """A llama.cpp grammar sampler and its parse state over the model's vocabulary."""

    FEW = 64  # best-scoring tokens tried before the whole vocabulary is masked

    def __init__(self, rt: LlamaRuntime, gbnf: str, source: str | Path,
                 _sampler: "llama_cpp.llama_sampler_p | None" = None) -> None:
        self.rt = rt
        self.gbnf = gbnf
        self.source = str(source)
        self.sampler = _sampler or llama_cpp.llama_sampler_init_grammar(rt.vocab, gbnf.encode("utf-8"), b"root")
        if not self.sampler:
            raise GrammarError(f"{source}: llama.cpp cannot parse this grammar")
        self._cand = np.zeros(rt.n_vocab, dtype=TOKEN_DATA)
        self._all_ids = np.arange(rt.n_vocab, dtype=np.int32)

    def clone(self) -> "Grammar":
        """A copy with the same parse state (a compiled task grammar, fresh per request)."""
        return Grammar(self.rt, self.gbnf, self.source, llama_cpp.llama_sampler_clone(self.sampler))

    def _apply(self, ids: np.ndarray, logits: np.ndarray | float) -> np.ndarray:
        """Of `ids`, those the grammar allows next, in the given order."""
        cand = self._cand[: len(ids)]
        cand["id"] = ids
        cand["logit"] = logits
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=len(cand), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(arr))
        kept = cand[: arr.size]
        return kept["id"][np.isfinite(kept["logit"])].copy()

    def allowed(self, logits: np.ndarray | None = None) -> np.ndarray:
        """Every token id the grammar allows next."""
        return self._apply(self._all_ids, 0.0 if logits is None else logits)

    def best(self, logits: np.ndarray) -> int:
        """The best-scoring allowed token: greedy decoding under the grammar."""
        finite = lambda ids: ids[np.isfinite(logits[ids])]  # noqa: E731  (banned tokens carry -inf)
        try:
            ok = self.rt.best_allowed(logits, lambda ids: self.restrict(finite(ids)), self.FEW)
        except Exception:
            raise GrammarError(f"{self.source}: the grammar allows no token here") from None
        return int(ok[np.argmax(logits[ok])])

    def restrict(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Of candidate `ids`, the allowed ones (empty when none is)."""
        return self._apply(np.asarray(ids, dtype=np.int32), 0.0)

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self.sampler)

    def close(self) -> None:
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
