"""Home Assistant's configuration.yaml for a home of the Home Assistant tests (used by ha_driver.py,
inside the HA venv: yaml is imported there)."""
from __future__ import annotations

# Kinds: input_boolean; light (a template light with brightness, kept in hidden helpers); switch; sensor (a
# fixed state with unit); cover (a template cover with position). Only the listed entities are exposed.

SENTIMENT_RECIPE = """\
# Sentiment from Home Assistant: a rest_command asks qwen-edge, a script stores and returns the label.
rest_command:
  qwen_edge_sentiment:
    url: "http://127.0.0.1:11434/v1/sentiment"
    method: POST
    content_type: "application/json"
    payload: '{{ {"text": text} | tojson }}'
    timeout: 60

input_text:
  last_sentiment:
    name: Last sentiment
    max: 32

script:
  sentiment_of_text:
    alias: Sentiment of a text
    description: Asks qwen-edge for the sentiment of a text, stores the label in input_text.last_sentiment
    fields:
      text:
        description: The text to classify
        example: I love this!
        required: true
    sequence:
      - action: rest_command.qwen_edge_sentiment
        data:
          text: "{{ text }}"
        response_variable: sentiment
      - if: "{{ sentiment.status != 200 }}"
        then:
          - stop: The sentiment service failed
            error: true
      - action: input_text.set_value
        target:
          entity_id: input_text.last_sentiment
        data:
          value: "{{ sentiment.content.label }}"
      - variables:
          result:
            label: "{{ sentiment.content.label }}"
            probability: "{{ sentiment.content.probability }}"
      - stop: Done
        response_variable: result
"""
RECIPE_URL = "http://127.0.0.1:11434"  # the daemon's default address; the test substitutes its own


def ha_configuration(home: dict, port: int, daemon_url: str | None) -> str:
    """configuration.yaml for the home (no default_config: only what the tests use loads)."""
    booleans, numbers, templates, covers = {}, {}, [], {}
    for e in home["entities"]:
        kind, oid, name = e["kind"], e["id"], e["name"]
        if kind == "input_boolean":
            booleans[oid] = {"name": name}
        elif kind in ("light", "switch"):
            booleans[f"{oid}_power"] = {"name": f"{oid} power"}
            on = [{"action": "input_boolean.turn_on", "target": {"entity_id": f"input_boolean.{oid}_power"}}]
            off = [{"action": "input_boolean.turn_off", "target": {"entity_id": f"input_boolean.{oid}_power"}}]
            item = {"name": name, "unique_id": oid, "state": f"{{{{ is_state('input_boolean.{oid}_power', 'on') }}}}",
                    "turn_on": on, "turn_off": off}
            if kind == "light":
                numbers[f"{oid}_level"] = {"name": f"{oid} level", "min": 0, "max": 255, "initial": 128}
                item["level"] = f"{{{{ states('input_number.{oid}_level') | int }}}}"
                item["set_level"] = [
                    {"action": "input_number.set_value", "target": {"entity_id": f"input_number.{oid}_level"},
                     "data": {"value": "{{ brightness }}"}}, *on]
            templates.append({kind: [item]})
        elif kind == "sensor":
            item = {"name": name, "unique_id": oid, "state": str(e["state"])}
            item.update({k: e[src] for k, src in (("unit_of_measurement", "unit"), ("device_class", "device_class"))
                         if e.get(src)})
            templates.append({"sensor": [item]})
        elif kind == "cover":
            numbers[f"{oid}_position"] = {"name": f"{oid} position", "min": 0, "max": 100, "initial": 0}
            pos = f"input_number.{oid}_position"
            covers[oid] = {"friendly_name": name, "unique_id": oid, "device_class": e.get("device_class", "garage"),
                           "position_template": f"{{{{ states('{pos}') | int }}}}",
                           "open_cover": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                           "data": {"value": 100}}],
                           "close_cover": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                            "data": {"value": 0}}],
                           "set_cover_position": [{"action": "input_number.set_value", "target": {"entity_id": pos},
                                                   "data": {"value": "{{ position }}"}}]}
        else:
            raise ValueError(f"unknown entity kind {kind!r}")
    config = {
        "homeassistant": {"name": home.get("name", "Test home"), "latitude": 52.37, "longitude": 4.89,
                          "elevation": 0, "unit_system": "metric", "time_zone": "UTC", "country": "NL",
                          "currency": "EUR", "language": home.get("language", "en")},
        "http": {"server_host": "127.0.0.1", "server_port": port},
        "logger": {"default": "warning", "logs": {"homeassistant.components.ollama": "debug",
                                                   "homeassistant.components.conversation": "debug"}},
        "conversation": {},
    }
    if booleans:
        config["input_boolean"] = booleans
    if numbers:
        config["input_number"] = numbers
    if templates:
        config["template"] = templates
    if covers:
        config["cover"] = [{"platform": "template", "covers": covers}]
    import yaml  # the HA venv has it; the driver is the only caller

    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    if daemon_url:
        text += "\n" + SENTIMENT_RECIPE.replace(RECIPE_URL, daemon_url)
    return text
