"""`qwen-edge bench http` against a live server over loopback (tiny model, a few texts)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge.cli.bench_http import bench_http, sentiment_prompt
from serving_helpers import PROMPTS, api_settings, serving_engine


@pytest.fixture(scope="module")
def live(tiny_gguf):
    with serving_engine(tiny_gguf, api_settings(chat={"max_tokens": 300})) as server:
        yield server


def test_bench_http_measures_a_running_daemon(live, tmp_path):
    texts = tmp_path / "texts.tsv"
    texts.write_text("text\tlabel\n" + "".join(f"sample text {i} is lovely\tpositive\n" for i in range(8)))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_http, ["--url", live.url, "--texts", str(texts), "--limit", "8",
                                             "--chat-tokens", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["results"][0]
    assert row["server"] == "qwen-edge" and row["texts"] == 8
    assert 0 < row["p50_ms"] <= row["p90_ms"] and row["decode_tps"] > 0 and row["rss_peak_mb"] > 0
    assert "p50_ms" in result.output


def test_peer_prompt_is_our_few_shot_prompt_in_chatml():
    head, tail, labels, grammar = sentiment_prompt(PROMPTS)
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_start|>user\n")
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    assert labels == {"Positive": "positive", "Negative": "negative"} and "Positive" in grammar
