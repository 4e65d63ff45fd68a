"""Rebuild en.tsv and zh.tsv of the spam evaluation set (see SOURCES.md).

    python make_sample.py --uci SMSSpamCollection --cn-sms train_sample.txt [--out DIR]

SMSSpamCollection: the UCI SMS Spam Collection v.1 (label<TAB>text, no header).
train_sample.txt:  the first 306 rows of the Chinese SMS set of the China Mobile research institute /
                   DataFountain contest (row number<TAB>1 spam / 0 ham<TAB>text), as copied on GitHub.
zh_written.txt (beside this script): Chinese messages written for this set (text<TAB>label).

Deterministic (fixed seeds), standard library only.
"""
from __future__ import annotations

import argparse
import html
import random
import re
from pathlib import Path

SEED = 20240615
N_EN = 150          # per label
CN_DROP = {"里春季服饰再度来临", "继xx年 完 美 操 作"}  # fragments with no recognisable content


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\t", " ").replace("\r", " ").replace("\n", " ")).strip()


def read_uci(path: Path) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {"spam": [], "ham": []}
    seen = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t", 1)
        text = clean(html.unescape(text))
        if text in seen or len(text.split()) < 2:
            continue
        seen.add(text)
        pools[label].append(text)
    return pools


def read_cn(path: Path) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {"spam": [], "ham": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        _, flag, text = line.split("\t", 2)
        text = clean(text)
        if text and text not in CN_DROP:
            pools["spam" if flag == "1" else "ham"].append(text)
    return pools


def read_written(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines if line]  # type: ignore[misc]


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("text\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uci", type=Path, required=True)
    ap.add_argument("--cn-sms", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    rng = random.Random(SEED)

    uci = read_uci(args.uci)
    en = [(t, "spam") for t in rng.sample(uci["spam"], N_EN)] + [(t, "ham") for t in rng.sample(uci["ham"], N_EN)]
    rng.shuffle(en)
    write(args.out / "en.tsv", en)

    cn = read_cn(args.cn_sms)
    n = min(len(cn["spam"]), len(cn["ham"]))
    zh = [(t, "spam") for t in rng.sample(cn["spam"], n)] + [(t, "ham") for t in rng.sample(cn["ham"], n)]
    zh += read_written(Path(__file__).parent / "zh_written.txt")
    rng.shuffle(zh)
    write(args.out / "zh.tsv", zh)


if __name__ == "__main__":
    main()
