"""On the real stand-in model (QWEN_EDGE_STANDIN_GGUF): obvious labels, and the bench's JSON keys."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge.cli import cli

pytestmark = pytest.mark.realmodel

OBVIOUS = [
    ("This is the best phone I have ever owned, I love it!", "positive"),
    ("Terrible service, the food was cold and the waiter was rude.", "negative"),
    ("这家酒店非常干净，服务周到，下次还来！", "positive"),
    ("质量太差了，用了一天就坏了，非常失望。", "negative"),
]
BENCH_KEYS = ("sentiment_p50_ms", "sentiment_p90_ms", "naive_sentiment_p50_ms", "naive_sentiment_p90_ms",
              "floor_sentiment_p50_ms", "bulk_items_per_s", "chat_ttft_ms", "chat_decode_tps", "raw_decode_tps",
              "peak_rss_mb", "p50_vs_floor", "naive_p90_over_engine_p90", "bulk_vs_prefill_bound",
              "chat_decode_vs_raw")


def test_obvious_sentences_get_obvious_labels(tmp_path, standin_gguf):
    tsv = tmp_path / "obvious.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in OBVIOUS), encoding="utf-8")
    res = CliRunner().invoke(cli, ["eval", "sentiment", str(tsv), "--model", str(standin_gguf), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["accuracy"] == 1.0


def test_bench_json_has_every_key(tmp_path, standin_gguf):
    short = tmp_path / "short.tsv"
    short.write_text("text\tlabel\na lovely little film .\tpositive\nboring .\tnegative\n", encoding="utf-8")
    long = tmp_path / "long.tsv"
    review = ("酒店位置不错，离火车站很近，但是房间的隔音非常差，隔壁说话听得清清楚楚，"
              "空调也有噪音，早餐品种很少而且是凉的，前台服务员态度冷淡，退房时还多收了费用，"
              "跟他们理论了半天才退回来，整个住宿体验很糟糕，以后出差再也不会选择这家酒店了，也不推荐朋友来住。")
    long.write_text(f"text\tlabel\n{review}\tnegative\n", encoding="utf-8")
    res = CliRunner().invoke(cli, ["bench", "--model", str(standin_gguf), "--json", "--short-file", str(short),
                                   "--long-file", str(long), "--n-short", "2", "--n-long", "1", "--n-bulk", "2",
                                   "--chat-turns", "1", "--chat-max-tokens", "4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    missing = [k for k in BENCH_KEYS if k not in out]
    assert not missing
    assert out["long"]["n"] == 1 and out["short"]["n"] == 2
    assert out["peak_rss_mb"] > 100 and out["sentiment_p50_ms"] > 0


@pytest.fixture(scope="module")
def standin_engine(standin_gguf):
    from edge.engine.engine import Engine
    from edge.settings import load_settings
    engine = Engine.load(standin_gguf, load_settings(None, chat={"max_tokens": 64, "temperature": 0.0}))
    yield engine
    engine.close()


@pytest.mark.parametrize("opening", ['```json\n{\n  "name', '{\n  "name'])
def test_a_pretty_printed_bare_call_is_a_call(standin_engine, opening):
    """Qwen's tokenizer has one token for "{\\n", which the grammar's compact JSON does not allow:
    the call must still be recognised (the stand-in writes calls this way in a fence)."""
    from tool_fixtures import WEATHER, _validate, steered

    from edge.engine.reply import ReplyFormat
    from edge.engine.tools import parse_tools
    from edge.engine.types import ChatMessage, ChatStats, SamplingParams
    assert b"{\n" in [standin_engine.rt.piece(t) for t in standin_engine.rt.tokenize(opening)]
    stats = ChatStats()
    with steered(standin_engine, opening):
        text = "".join(standin_engine.chat_stream([ChatMessage("user", "weather in Rome?")],
                                                  SamplingParams(temperature=0.0), stats,
                                                  ReplyFormat(tools=parse_tools(WEATHER))))
    assert text == "" and stats.finish_reason == "tool_calls"
    _validate(stats.tool_calls, WEATHER)


@pytest.mark.parametrize("home, message, choice, call", [
    ("house_en", "Turn off the desk lamp", "required", ("HassTurnOff", "Desk lamp")),
    ("house_en", "Is the garage door open?", "GetLiveContext", None),
    ("home_zh", "打开书房台灯", "required", ("HassTurnOn", "书房台灯")),
    ("house_en", "Tell me a joke about cats.", "auto", None)])
def test_home_assistants_requests_are_routed_by_their_intent(standin_engine, home, message, choice, call):
    """The shipped routing on the stand-in: a command must call, a state question asks Home
    Assistant, small talk is left to the model; a command's call names the device."""
    from tool_fixtures import DATA

    from edge.engine.reply import ReplyFormat
    from edge.engine.tools import parse_tools
    from edge.engine.types import ChatMessage, ChatStats, SamplingParams
    recorded = json.loads((DATA / "tools_eval" / "homes" / f"{home}.json").read_text(encoding="utf-8"))["recorded"]
    messages = [ChatMessage("system", recorded["system_prompt"]), ChatMessage("user", message)]
    fmt = standin_engine.route(messages, ReplyFormat(tools=parse_tools(recorded["tools"])))
    assert fmt.tools is not None and fmt.tools.choice == choice
    if call is not None:
        stats = ChatStats()
        "".join(standin_engine.chat_stream(messages, SamplingParams(temperature=0.0), stats, fmt))
        assert (stats.tool_calls[0].name, stats.tool_calls[0].arguments.get("name")) == call
