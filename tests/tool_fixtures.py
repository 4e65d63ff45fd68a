"""What the tool-call tests share: the recorded Home Assistant homes and tools, a weather tool, a
way to steer the tiny model's first tokens, and the tiny engine and live server they run on."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from serving_helpers import api_settings, serving_engine

from edge.engine.types import SamplingParams, ToolCall

DATA = Path(__file__).resolve().parent / "data"
HA_REQUEST = json.loads((DATA / "home_assistant" / "01_assist_en_turn_on.json").read_text(encoding="utf-8"))
HA_TOOLS = HA_REQUEST["tools"]
HOUSE = json.loads((DATA / "tools_eval" / "homes" / "house_en.json").read_text(encoding="utf-8"))["recorded"]
GREEDY = SamplingParams(max_tokens=160, temperature=0.0)
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}]


ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "required": ["hour"], "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                          "label": {"type": "string", "maxLength": 10}}}}}
# what the `ollama` client sends of WEATHER: its Tool model keeps type, enum and required, and drops
# maxLength / minimum / maximum, so the server can only enforce this
WEATHER_VIA_OLLAMA = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}, "days": {"type": "integer"}}}}}]


def _validate(calls: list[ToolCall], tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls, "no call"
    for call in calls:
        assert call.name in schemas, call
        jsonschema.validate(call.arguments, schemas[call.name])


@contextmanager
def steered(engine, text: str):
    """Make the model write `text` first (its tokens get the best logits), then whatever it wants."""
    plan = engine.rt.tokenize(text, special=True)
    real = engine.rt.logits

    def logits(row: int) -> np.ndarray:
        out = real(row).copy()
        if plan:
            out[plan.pop(0)] = out.max() + 1000.0
        return out
    engine.rt.logits = logits
    try:
        yield
    finally:
        del engine.rt.logits


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    """A context big enough for Home Assistant's prompts in the tiny model's byte-level tokenizer."""
    from engine_fixtures import tiny_settings

    from edge.engine.engine import Engine
    settings = tiny_settings()
    settings.model.n_ctx = 8192
    eng = Engine.load(tiny_gguf, settings)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def live(tiny_gguf):
    with serving_engine(tiny_gguf, api_settings(model={"n_ctx": 8192}, chat={"max_tokens": 120})) as server:
        yield server
