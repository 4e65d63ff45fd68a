"""Home Assistant's tool calls beyond validity: the argument rules (values the prompt lists or the
user's message writes, the order the model is shown) and routing by the home_intent task."""
from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
from tool_fixtures import DATA, GREEDY, HOUSE, WEATHER, engine, live, steered  # noqa: F401  (engine, live: fixtures)

from edge.engine.grammar import Grammar
from edge.engine.reply import ReplyFormat
from edge.engine.tools import call_gbnf, parse_tools
from edge.engine.types import ChatMessage, ChatStats


def test_argument_rules_keep_name_and_area_apart_and_the_target_first(engine):
    """HA's prompt: "prefer passing just name and domain" / "just area name and domain"; a light gets
    one change a call; a brightness is one the user's message wrote."""
    from dataclasses import replace
    spec = replace(parse_tools(HOUSE["tools"], "required"), rules=engine.chat.rules, system_text=HOUSE["system_prompt"],
                   user_texts=("Desk lamp to 40 percent please",))
    grammar = Grammar(engine.rt, call_gbnf(spec, "forced"), "tools")

    def next_texts(prefix: str) -> set[str]:
        g = grammar.clone()
        try:
            for tok in engine.rt.tokenize(prefix, special=True):
                assert tok in set(g.allowed().tolist()), prefix
                g.accept(tok)
            return {engine.rt.piece(int(t)).decode("utf-8", "replace") for t in g.allowed()}
        finally:
            g.close()
    try:
        light = '<tool_call>\n{"name": "HassLightSet", "arguments": {"name": "Desk lamp", '
        after_name = next_texts(light + '"')
        assert any(t.startswith("b") for t in after_name) and any(t.startswith("d") for t in after_name)
        assert not any(t.startswith("a") for t in after_name)  # no area next to a name
        assert next_texts(light + '"brightness": ') == {"4"}  # the message's number, and only it
        # one change a call: nothing but the end after the brightness (no color, no temperature)
        assert not any(t.strip(" ,") for t in next_texts(light + '"brightness": 40') if t.strip(" ,") not in "}")
    finally:
        grammar.close()
    # an area the user named: the call targets it, and no name can come next to it
    grammar = Grammar(engine.rt, call_gbnf(replace(spec, user_texts=("Turn off the kitchen",)), "forced"), "tools")
    try:
        after_area = next_texts('<tool_call>\n{"name": "HassTurnOff", "arguments": {"area": "Kitchen", "')
        assert after_area and not any(t.startswith("n") for t in after_area)
    finally:
        grammar.close()


@pytest.mark.parametrize("message, integers", [
    ("Dim the living room lamp to 30%", [30]), ("书房台灯亮度调到百分之八十", [80]),
    ("把客厅窗帘开到百分之三十五", [35]), ("一百零五, 两个, 十五 and 7.5", [105, 15]), ("调暗一点", []),
    ("turn it off", [])])
def test_values_written_in_the_message(message, integers):
    from edge.engine.tool_rules import written_values
    assert written_values("integer", message) == integers


def test_from_message_arguments_take_only_what_the_user_wrote():
    """The shipped rules: brightness, position, temperature and color only as the message writes them."""
    from dataclasses import replace

    from edge.engine.tool_rules import load_rules
    from edge.engine.tools import call_schema
    rules = load_rules(Path(__file__).resolve().parents[1] / "prompts" / "tools" / "argument_values.toml")
    spec = replace(parse_tools(HOUSE["tools"]), choice="HassLightSet", rules=rules, system_text=HOUSE["system_prompt"])

    def arguments(message: str) -> dict:
        variants = call_schema(replace(spec, user_texts=(message,)))["anyOf"][0]["properties"]["arguments"]
        merged: dict = {}
        for variant in jsonschema_variants(variants):
            merged |= variant["properties"]
        return merged
    args = arguments("Make the desk lamp red at 25 percent")
    assert args["brightness"]["enum"] == [25] and args["temperature"]["enum"] == [25] and "red" in args["color"]["enum"]
    assert "brightness" not in arguments("Make the desk lamp red") and "color" not in arguments("台灯调暗一点")
    assert arguments("书房台灯亮度调到百分之八十")["brightness"]["enum"] == [80]


def _house_call(*user_texts: str, home: dict = HOUSE) -> dict[str, dict]:
    """Per tool, the argument properties a call may have (the alternatives merged) after `user_texts`,
    under the shipped rules."""
    from dataclasses import replace

    from edge.engine.tool_rules import load_rules
    from edge.engine.tools import call_schema
    rules = load_rules(Path(__file__).resolve().parents[1] / "prompts" / "tools" / "argument_values.toml")
    spec = replace(parse_tools(home["tools"]), rules=rules, system_text=home["system_prompt"], user_texts=user_texts)
    calls = {}
    for alt in call_schema(spec)["anyOf"]:
        variants = jsonschema_variants(alt["properties"]["arguments"])
        calls[alt["properties"]["name"]["const"]] = {
            "properties": {k: v for variant in variants for k, v in variant["properties"].items()},
            "required": {r for variant in variants for r in variant.get("required", [])}}
    return calls


def test_the_call_targets_what_the_user_named():
    """[as_written]: a name the user wrote is the target (required, no area); else an area they wrote;
    else, as for a Chinese request in a home listed in English, the listed values stand."""
    off = _house_call("Turn off everything in the office")["HassTurnOff"]
    assert off["properties"]["area"]["enum"] == ["Office"] and "area" in off["required"] and "name" not in off["properties"]
    on = _house_call("Please turn on the kitchen lights")["HassTurnOn"]  # an alias, in the plural
    assert on["properties"]["name"]["enum"] == ["Kitchen light"] and "area" not in on["properties"]
    again = _house_call("Turn on the desk lamp", "Turn it off again")["HassTurnOff"]  # an earlier message names it
    assert again["properties"]["name"]["enum"] == ["Desk lamp"]
    across = _house_call("关掉书桌台灯")["HassTurnOff"]
    assert len(across["properties"]["name"]["enum"]) > 5 and "area" in across["properties"]
    home_zh = json.loads((DATA / "tools_eval" / "homes" / "home_zh.json").read_text(encoding="utf-8"))["recorded"]
    assert _house_call("把客厅吊灯关了", home=home_zh)["HassTurnOff"]["properties"]["name"]["enum"] == ["客厅吊灯"]
    assert _house_call("打开卫生间的热水器", home=home_zh)["HassTurnOn"]["properties"]["name"]["enum"] == ["热水器"]
    # a list of listed values has no more items than values (unbounded, the stand-in looped to max_tokens)
    assert across["properties"]["domain"]["maxItems"] == len(across["properties"]["domain"]["items"]["enum"])


@pytest.mark.parametrize("value, message, written", [
    ("Kitchen light", "turn on the KITCHEN LIGHTS", True), ("Hall", "the hallway light", False),
    ("Desk lamp", "desk lamp.", True), ("客厅", "把客厅的灯都关了", True), ("Office", "offices", True)])
def test_what_a_message_writes(value, message, written):
    from edge.engine.tool_rules import is_written
    assert is_written(value, message) is written


def test_a_level_goes_to_the_tool_of_the_named_device_and_words_give_values():
    home_zh = json.loads((DATA / "tools_eval" / "homes" / "home_zh.json").read_text(encoding="utf-8"))["recorded"]
    assert set(_house_call("客厅窗帘开到百分之三十", home=home_zh)) == {"HassSetPosition"}
    brightest = _house_call("厨房灯调到最亮", home=home_zh)
    assert set(brightest) == {"HassLightSet"} and brightest["HassLightSet"]["properties"]["brightness"]["enum"] == [100]
    assert set(_house_call("Dim the kitchen to 30%")) == {"HassLightSet", "HassSetPosition"}  # an area: both
    assert "HassTurnOn" in _house_call("Set a timer for 10 minutes")  # a plain number is no level
    red = _house_call("把书桌台灯调成红色")["HassLightSet"]["properties"]
    assert red["color"]["enum"] == ["red"]
    assert "color" not in _house_call("Desk lamp to full brightness")["HassLightSet"]["properties"]  # "full": no colour


def test_rules_that_name_what_they_cannot_use_are_refused(tmp_path):
    from edge.engine.grammar import GrammarError
    from edge.engine.tool_rules import load_rules
    path = tmp_path / "argument_values.toml"
    rule = "[[rule]]\nargument = 'name'\npattern = '^- names: (.+)$'\n"
    for text, error in [(rule + "[as_written]\narguments = ['area']\n", "area, which no"),
                        ("[from_message]\narguments = ['brightness']\n[from_message.words.color]\nred = 'red'\n", "color"),
                        ("[levels]\nentity_pattern = '^- names: (.+)$'\n", "groups"),
                        (rule + "[as_written]\narguments = ['name']\n[levels]\n"
                         "entity_pattern = '^- names: (?P<names>.+)\\n  domain: (?P<domain>.+)$'\n", "entity_argument"),
                        ("[from_message]\narguments = ['color']\nwords = 3\n", "argument_values.toml")]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(GrammarError, match=error):
            load_rules(path)


def jsonschema_variants(schema: dict) -> list[dict]:
    """The object schemas of a (nested) anyOf."""
    return [v for alt in schema["anyOf"] for v in jsonschema_variants(alt)] if "anyOf" in schema else [schema]


def test_the_model_is_shown_the_arguments_in_the_order_the_grammar_writes_them(engine):
    from dataclasses import replace

    from edge.engine.tools import shown_definitions
    spec = replace(parse_tools(HOUSE["tools"]), rules=engine.chat.rules, system_text=HOUSE["system_prompt"])
    light = next(d for d in shown_definitions(spec) if d["function"]["name"] == "HassLightSet")
    assert list(light["function"]["parameters"]["properties"])[:3] == ["name", "area", "domain"]
    assert list(light["function"]["parameters"]["properties"]).index("brightness") < \
        list(light["function"]["parameters"]["properties"]).index("color")
    plain = parse_tools(WEATHER)  # no rules apply to a prompt that lists no devices: as sent
    assert shown_definitions(plain) == [t.definition for t in plain.tools]


# -- routing: a label task sets the tool choice ------------------------------------------------------

HA_NAMES = ("HassTurnOn", "HassTurnOff", "GetLiveContext")


def _routing(choice: str, min_probability: float = 0.0):
    from edge.engine.tools import ToolRouting
    return ToolRouting("home_intent", HA_NAMES, {label: choice for label in ("control", "state", "other")},
                       min_probability)


def test_routing_files_are_checked_against_the_tasks(tmp_path):
    from edge.engine.grammar import GrammarError
    from edge.engine.tools import load_routing
    labels = {"home_intent": ["control", "state", "other"]}
    path = tmp_path / "routing.toml"
    assert load_routing(path, labels) is None  # no file: no routing
    for text, error in [('task = "nope"\nwhen_tools = ["a"]\n[choice]\n', "not a label task"),
                        ('task = "home_intent"\nwhen_tools = ["a"]\n[choice]\ncontrl = "required"\n', "contrl"),
                        ('task = "home_intent"\n[choice]\n', "when_tools"),
                        ('task = "home_intent"\nwhen_tools = []\n[choice]\n', "when_tools"),
                        ("task = [", "routing.toml")]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(GrammarError, match=error) as info:
            load_routing(path, labels)
        assert str(path) in str(info.value)
    path.write_text('task = "home_intent"\nwhen_tools = ["HassTurnOn"]\nmin_probability = 0.5\n'
                    '[choice]\nstate = "GetLiveContext"\n', encoding="utf-8")
    routing = load_routing(path, labels)
    assert routing is not None and routing.choices == {"state": "GetLiveContext"} and routing.min_probability == 0.5


def test_only_the_users_own_turn_with_the_named_tools_and_choice_auto_is_routed():
    from dataclasses import replace

    from edge.engine.tools import routed, routed_message
    routing = _routing("GetLiveContext", min_probability=0.6)
    ha, user = parse_tools(HOUSE["tools"]), [ChatMessage("system", "s"), ChatMessage("user", "is it on?")]
    assert routed_message(routing, ha, user) == "is it on?"
    assert routed_message(None, ha, user) is None
    assert routed_message(routing, parse_tools(WEATHER), user) is None            # not Home Assistant's tools
    assert routed_message(routing, replace(ha, choice="none"), user) is None      # the client chose
    assert routed_message(routing, ha, [*user, ChatMessage("tool", "{}")]) is None  # after a tool result
    assert routed_message(routing, ha, [ChatMessage("user", "  ")]) is None
    assert routed(ha, routing, "state", 0.9).choice == "GetLiveContext"
    assert routed(ha, routing, "state", 0.5).choice == "auto"                     # unsure: the model decides
    assert routed(parse_tools(WEATHER), routing, "state", 0.9).choice == "auto"   # a tool it does not offer


def test_a_routed_request_gets_the_call_its_label_routes_to(engine):
    spec = parse_tools(HOUSE["tools"])
    messages = [ChatMessage("system", HOUSE["system_prompt"]), ChatMessage("user", "Is the desk lamp on?")]
    saved = engine.routing
    try:
        engine.routing = _routing("GetLiveContext")
        stats = ChatStats()
        "".join(engine.chat_stream(messages, GREEDY, stats, engine.route(messages, ReplyFormat(tools=spec))))
        assert {c.name for c in stats.tool_calls} == {"GetLiveContext"} and stats.finish_reason == "tool_calls"
        engine.routing = _routing("GetLiveContext", min_probability=1.01)  # never sure enough
        assert engine.route(messages, ReplyFormat(tools=spec)).tools.choice == "auto"
        engine.routing = _routing("none")
        stats = ChatStats()
        with steered(engine, "<tool_call>"):  # the model would call; the route says text
            text = "".join(engine.chat_stream(messages, GREEDY, stats, engine.route(messages, ReplyFormat(tools=spec))))
        assert not stats.tool_calls and "tool_call>" in text
    finally:
        engine.routing = saved


def test_ollama_requests_are_routed_and_the_label_is_counted(live):
    engine = live.serving.engine
    saved = engine.routing
    try:
        engine.routing = _routing("required")
        reply = ollama.Client(host=live.url).chat("qwen-edge", [
            {"role": "system", "content": HOUSE["system_prompt"]}, {"role": "user", "content": "Desk lamp off"}],
            tools=HOUSE["tools"], options={"temperature": 0})
        assert reply.message.tool_calls, reply.message.content
        assert {c.function.name for c in reply.message.tool_calls} <= {t["function"]["name"] for t in HOUSE["tools"]}
        with live.client() as http:
            assert 'task="home_intent"' in http.get("/metrics").text
    finally:
        engine.routing = saved


def test_a_routing_to_a_refused_task_turns_routing_off_and_the_rest_serves(tiny_gguf, tmp_path, caplog):
    import shutil

    from engine_fixtures import PROMPTS, tiny_settings

    from edge.engine.engine import Engine
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS, prompts)
    (prompts / "tasks" / "home_intent" / "labels.toml").write_text("[control]\nen = 'control'\n", encoding="utf-8")
    with caplog.at_level("ERROR"):
        eng = Engine.load(tiny_gguf, tiny_settings(prompts))
    try:
        assert eng.routing is None and "home_intent" not in eng.tasks and "sentiment" in eng.tasks
        assert any("tool routing is off" in r.getMessage() for r in caplog.records)
    finally:
        eng.close()
