"""`qwen-edge eval chat`: the reply measures on hand-made replies, and the command on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import cli
from edge.engine.tasks import detect_language
from edge.engine.types import SamplingParams
from edge.evaluation.chat_eval import (Turn, cjk_share, evaluate, in_language, load_cases, overlap, refusal,
                                       summary, verbatim)
from edge.evaluation.datasets import DatasetError

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "data" / "chat_eval" / "cases.jsonl"


# -- language ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, lang, expected", [
    ("听起来你今天过得很辛苦，先好好休息一下吧。", "zh", True),
    ("可以在 NAS 上用 Docker Compose 部署 Home Assistant，然后在路由器里固定它的 IP 地址。", "zh", True),
    ("That sounds exhausting. Take a break and be kind to yourself.", "en", True),
    ("Your friend 小明 sounds like a good listener; talk to him tonight.", "en", True),
    ("I understand. 我理解你的感受，这确实很难过。", "en", False),   # a Chinese sentence in an English reply
    ("Sure, here is how: run the backup, then check the log and restart the service.", "zh", False),
    ("听起来不错！```\nsudo apt-get install rsync && rsync -av --delete src/ dst/ && echo done\n```", "zh", True),
    ("🙂👍", "en", False),   # no letters: no language
    ("", "zh", False),
])
def test_reply_language(reply, lang, expected):
    assert in_language(reply, lang) is expected


def test_language_rule_is_detect_languages_threshold():
    for text in ("好的 ok", "ok 好的 fine thanks", "今天天气很好", "hello there", "a 好"):
        share = cjk_share(text)
        assert (share >= 0.2) == (detect_language(text) == "zh"), text


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    "对不起，我无法提供这个信息。如果你有其他问题，请告诉我。",     # issue 15's example
    "抱歉，我不能回答这个问题。",
    "作为一个人工智能，我无法为你提供建议。",
    "I'm sorry, but I can't help with that.",
    "I’m sorry, but I cannot assist with this request.",                # curly apostrophe
    "As an AI language model, I cannot give personal opinions.",
    "I am unable to provide that kind of advice.",
])
def test_refusals_are_found(reply):
    assert refusal(reply) is not None


@pytest.mark.parametrize("reply", [
    "I'm sorry to hear that. It sounds like a rough day; do you want to talk about it?",
    "I can't imagine how hard that must be. Be gentle with yourself.",
    "I can't help but smile reading this. Congratulations!",
    "很抱歉听到这个消息，你现在感觉怎么样？",
    "我无法想象你有多难过，但我在这里听你说。",
])
def test_sympathy_is_not_a_refusal(reply):
    assert refusal(reply) is None


# -- parroting -----------------------------------------------------------------------------------

USER_ZH = "今天被领导当着全组的面批评了，心里特别难受。"
USER_EN = "My neighbour plays loud music every night until two in the morning."


def test_word_for_word_repetition_is_verbatim():
    assert verbatim([USER_ZH], "今天被领导当着全组的面批评了。我明白。", "zh") == "今天被领导当着全组的面批评了"
    # case, spacing and punctuation do not hide a copy
    assert verbatim([USER_EN], "my neighbour plays LOUD music, every night until two in the morning!", "en")


def test_reflection_and_short_echoes_are_not_verbatim():
    assert verbatim([USER_EN], "Your neighbour plays loud music every night? That must be exhausting.", "en") is None
    assert verbatim(["我终于通过驾照考试了！太开心了！"], "太开心了！恭喜你通过考试！", "zh") is None  # 4-character sentence
    assert verbatim([USER_ZH], "被批评确实让人难受，先深呼吸。", "zh") is None


def test_an_earlier_turn_repeated_counts():
    assert verbatim([USER_EN, "What should I do?"], "OK. My neighbour plays loud music every night until two "
                    "in the morning, you said.", "en")


def test_near_verbatim_overlap():
    assert overlap(USER_EN, USER_EN.upper()) == 1.0
    assert overlap(USER_EN, "That sounds really tiring. Have you talked to them?") == 0.0
    assert overlap("Hi there!", "Hi there!") is None   # too short to score
    partly = overlap(USER_EN, "Loud music every night until two in the morning is too much.")
    assert 0.3 < partly < 1.0


# -- the report ----------------------------------------------------------------------------------

def _turn(reply: str, finish: str = "stop", lang: str = "en") -> Turn:
    return Turn("c", 1, lang, "question", "hi", reply, finish, 3, 10.0, 5.0, in_language(reply, lang))


def test_summary_counts_empty_and_truncated():
    turns = [_turn("Fine, thanks."), _turn("  \n", "stop"), _turn("A long answer that was cut", "length"),
             _turn("还好。")]
    s = summary(turns)
    assert (s["n"], s["empty"], s["truncated"], s["in_language"]) == (4, 1, 1, 2)
    assert s["truncated_rate"] == 0.25 and s["median_chars"] == pytest.approx(8.0)


def test_cases_file_and_splits():
    every = load_cases(CASES)
    assert len(every) == 96 and sum(len(c.turns) for c in every) == 140
    tune, held = load_cases(CASES, "tune"), load_cases(CASES, "heldout")
    assert {c.id for c in tune}.isdisjoint(c.id for c in held) and len(tune) + len(held) == 96
    assert {c.lang for c in tune} == {"zh", "en"}


def test_bad_case_is_refused_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "lang": "en", "turns": ["hi"]}\n{"id": "b", "lang": "fr", "turns": ["salut"]}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2"):
        load_cases(path)


# -- on the tiny model ---------------------------------------------------------------------------

TINY_CASES = [{"id": "zh-x-1", "lang": "zh", "category": "complaint", "turns": ["这家餐厅太难吃了。", "我该投诉吗？"]},
              {"id": "en-x-1", "lang": "en", "category": "question", "turns": ["What is a NAS?"]}]


@pytest.fixture
def tiny_files(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in TINY_CASES), encoding="utf-8")
    config = tmp_path / "tiny.toml"
    config.write_text(f"[model]\nn_ctx = 4096\nn_batch = 256\nn_threads = 2\n"
                      f"[prompts]\nmax_text_tokens = 96\ndir = {json.dumps(str(ROOT / 'prompts'))}\n"
                      f"[chat]\nmax_tokens = 8\nemotion_hints = true\n[engine]\nprefix_tokens = 2048\n")
    return cases, config


def test_eval_chat_json_report_is_well_formed(tiny_files, tiny_gguf):
    cases, config = tiny_files
    res = CliRunner().invoke(cli, ["eval", "chat", str(cases), "--model", str(tiny_gguf), "--config", str(config),
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    turns = out["turns"]
    assert [(t["id"], t["turn"]) for t in turns] == [("zh-x-1", 1), ("zh-x-1", 2), ("en-x-1", 1)]
    assert out["all"]["n"] == 3 and set(out["by_language"]) == {"zh", "en"}
    assert sum(row["n"] for row in out["by_language"].values()) == 3
    assert all(t["tokens"] <= 8 and t["finish"] in ("stop", "length") for t in turns)
    assert out["all"]["truncated"] == sum(t["finish"] == "length" for t in turns)
    assert out["all"]["in_language"] == sum(t["in_language"] for t in turns)
    for key in ("refusals_rate", "verbatim_rate", "near_verbatim_rate", "empty_rate", "in_language_rate"):
        assert 0 <= out["all"][key] <= 1
    assert out["all"]["median_chars"] >= 0 and out["all"]["ttft_p50_ms"] > 0


def test_eval_chat_prints_a_table(tiny_files, tiny_gguf):
    cases, config = tiny_files
    res = CliRunner().invoke(cli, ["eval", "chat", str(cases), "--model", str(tiny_gguf), "--config", str(config),
                                   "--limit", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("all") and "n=  2" in lines[0] and "in language" in lines[0]
    assert any(line.startswith("zh ") for line in lines) and not any(line.startswith("en ") for line in lines)


def test_same_seed_same_replies(engine, tmp_path):
    cases = [c for c in load_cases(CASES) if c.id in {"zh-emotional-01", "en-question-01"}]
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=8)
    a, b = evaluate(engine, cases, params), evaluate(engine, cases, params)
    assert [t["reply"] for t in a["turns"]] == [t["reply"] for t in b["turns"]]
