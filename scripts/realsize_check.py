#!/usr/bin/env python3
"""Real-size check of the converter (issue 2): a real Qwen2-family GGUF → HF folder → our pipeline.

    .venv/bin/python scripts/realsize_check.py --standin STANDIN.gguf --work /tmp/realsize \
        [--prompts 60] [--qwen15 | --qwen15-only] [--keep] [--json figures.json]

Steps, each in its own process, timed, with peak RSS (VmHWM) and peak anonymous RSS (RssAnon),
sampled from /proc every 20 ms:
  1. ../shared/tools/gguf_to_hf.py  STANDIN → HF folder (float32 safetensors)
  2. scripts/convert_and_quantize.sh --types f32, then q8_0, then q4_k_m (each reusing the F32)
  3. optionally (--qwen15) make_qwen15_shaped.py → the same three conversions of Qwen1.5-0.5B's shapes
Then, after all measured steps (so this process is still small while they run): every F32 GGUF
tensor against the source safetensors tensor (exact), and next-token top-1 agreement on Chinese,
English and ChatML prompts: our F32 vs the original GGUF, Q8_0 vs our F32, Q4_K_M vs our F32.
Prints the figures as JSON; deletes the multi-GB outputs unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools"
MIB = 1 << 20

ZH = ["今天天气", "我非常喜欢这家餐厅的", "这部电影的结局让我", "请用一句话介绍北京：", "春天来了，公园里",
      "他每天早上六点起床，然后", "人工智能的发展对社会", "我昨天买的手机屏幕", "学习一门新语言最重要的是",
      "这家酒店的服务态度", "中国的四大发明是", "小明考试没考好，他感到", "下雨天最适合", "我的猫总是喜欢",
      "健康的生活方式包括", "这本书讲述了一个关于", "周末我们打算去", "老师说明天的作业是", "快递终于到了，打开一看",
      "如果我有一百万，我会"]
EN = ["The capital of France is", "I really enjoyed the movie because", "The weather today is", "Once upon a time,",
      "My favourite food is", "The best way to learn programming is", "After a long day at work, I",
      "The customer service was terrible and", "Water boils at a temperature of", "She opened the door and saw",
      "The most important thing in life is", "In the morning I usually drink", "This phone's battery lasts",
      "The train was late again, so", "Dogs are loyal animals that", "To make a cup of tea, first",
      "The meeting has been moved to", "Honestly, the hotel room was", "He scored the winning goal in",
      "The quick brown fox"]
CHAT_USER = ["你好，请介绍一下你自己。", "今天心情不好，怎么办？", "这家店的菜太难吃了。", "推荐一本好书吧。",
             "What is the capital of Japan?", "I feel lonely tonight.", "The package arrived broken, I'm so angry!",
             "Can you help me write a short poem?", "我考试通过了，太开心了！", "How do I boil an egg?",
             "我的电脑很慢，怎么办？", "Tell me a joke.", "我失恋了。", "What's 12 times 7?", "今天是我的生日！",
             "Thank you for your help!", "北京有什么好玩的地方？", "I lost my keys again.",
             "这部手机值得买吗？", "Give me three tips for sleeping better."]


def chatml(user: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def prompts(n: int) -> list[tuple[str, str]]:
    every = [("zh", p) for p in ZH] + [("en", p) for p in EN] + [("chatml", chatml(u)) for u in CHAT_USER]
    return every[:n]


def _proc_status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS of the current process image) and RssAnon, in bytes; {} once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmHWM", "RssAnon")}
    except (OSError, ValueError):
        return {}


def measure(label: str, cmd: list[str], results: list[dict]) -> dict:
    """Run `cmd`; wall time and peak RSS sampled every 20 ms from /proc (VmHWM, not ru_maxrss:
    the kernel carries a parent's peak across fork+exec). Fail loudly on error."""
    print(f"[{label}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak_rss = peak_anon = 0
    while True:
        pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = _proc_status(proc.pid)
        peak_rss, peak_anon = max(peak_rss, now.get("VmHWM", 0)), max(peak_anon, now.get("RssAnon", 0))
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"step": label, "cmd": " ".join(cmd), "wall_s": round(time.monotonic() - start, 1),
           "peak_rss_mib": round(peak_rss / MIB), "peak_anon_mib": round(peak_anon / MIB),
           "rc": proc.returncode}
    results.append(row)
    if proc.returncode != 0:
        raise SystemExit(f"step {label} failed with exit code {proc.returncode}")
    return row


def compare_tensors(gguf_path: Path, hf_dir: Path) -> tuple[int, int]:
    """(tensors compared, tensors exactly equal): every GGUF tensor vs its source safetensors tensor."""
    import gguf
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT))
    from edge.convert.safetensors_reader import SafetensorsCheckpoint
    from edge.convert.tensor_names import read_hyperparams, tensor_plan

    hp = read_hyperparams(hf_dir)
    ck = SafetensorsCheckpoint.open(hf_dir)
    plan = dict(tensor_plan(hp, {n: e.shape for n, e in ck.entries.items()}, hf_dir))
    reader = gguf.GGUFReader(gguf_path)
    equal = 0
    for t in reader.tensors:
        entry = ck.entries[plan[t.name]]
        with safe_open(str(entry.file), framework="numpy") as f:  # independent of our reader
            src = f.get_tensor(plan[t.name]).astype(np.float32)
        equal += bool(np.array_equal(np.asarray(t.data).reshape(src.shape), src))
        del src
    return len(reader.tensors), equal


def top1(path: Path, texts: list[str], threads: int) -> tuple[list[int], list[list[int]]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
    try:
        ids_all, best = [], []
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            best.append(int(np.argmax(llm.scores[len(ids) - 1])))
            ids_all.append(ids)
        return best, ids_all
    finally:
        llm.close()


def agreement(a: list[int], b: list[int], kinds: list[str]) -> dict:
    out = {"all": float(np.mean([x == y for x, y in zip(a, b)]))}
    for k in sorted(set(kinds)):
        out[k] = float(np.mean([x == y for x, y, kk in zip(a, b, kinds) if kk == k]))
    return out


def convert_steps(wrapper: str, src: Path, out: Path, name: str, label: str, threads: int, steps: list[dict]) -> dict:
    """F32, then Q8_0, then Q4_K_M (each reusing the F32), each its own measured process; sizes in MB."""
    for kind in ("f32", "q8_0", "q4_k_m"):
        measure(f"{label} {kind}", [wrapper, "--from-dir", str(src), "--out", str(out), "--types", kind,
                                    "--name", name, "--no-progress", "--threads", str(threads)], steps)
    return {k: round((out / f"{name}-{k}.gguf").stat().st_size / 1e6, 1) for k in ("f32", "q8_0", "q4_k_m")}


def comparisons(standin: Path, hf: Path, out: Path, n_prompts: int, threads: int, figures: dict) -> None:
    files = {k: out / f"standin-{k}.gguf" for k in ("f32", "q8_0", "q4_k_m")}
    figures["source_mb"] = round(sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 1e6, 1)
    n, equal = compare_tensors(files["f32"], hf)
    figures["f32_tensors"] = {"compared": n, "exactly_equal": equal}
    chosen = prompts(n_prompts)
    kinds, texts = [k for k, _ in chosen], [t for _, t in chosen]
    tops, ids = {}, {}
    for name, path in [("original", standin), *files.items()]:
        tops[name], ids[name] = top1(path, texts, threads)
    figures["prompts"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    figures["same_token_ids_as_original"] = sum(x == y for x, y in zip(ids["f32"], ids["original"]))
    figures["top1"] = {"f32_vs_original": agreement(tops["f32"], tops["original"], kinds),
                       "q8_0_vs_f32": agreement(tops["q8_0"], tops["f32"], kinds),
                       "q4_k_m_vs_f32": agreement(tops["q4_k_m"], tops["f32"], kinds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--standin", type=Path, default=os.environ.get("QWEN_EDGE_STANDIN_GGUF"), required=False)
    ap.add_argument("--work", type=Path, default=Path("/tmp/realsize"))
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qwen15", action="store_true", help="also convert a Qwen1.5-0.5B-shaped folder")
    ap.add_argument("--qwen15-only", action="store_true", help="only the Qwen1.5-shaped steps")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB outputs")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    a = ap.parse_args()
    if not a.standin or not a.standin.is_file():
        raise SystemExit("need --standin GGUF (or QWEN_EDGE_STANDIN_GGUF)")
    py, wrapper = sys.executable, str(ROOT / "scripts" / "convert_and_quantize.sh")
    hf, out, q15 = a.work / "hf", a.work / "out", a.work / "qwen15"
    a.work.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []
    figures: dict = {"standin": str(a.standin), "steps": steps}
    try:  # every measured step first, while this process is still small
        measure("gguf_to_hf", [py, str(TOOLS / "gguf_to_hf.py"), str(a.standin), str(hf)], steps)
        if not a.qwen15_only:
            figures["sizes_mb"] = convert_steps(wrapper, hf, out, "standin", "convert", a.threads, steps)
            figures["sizes_mb"]["original"] = round(a.standin.stat().st_size / 1e6, 1)
        if a.qwen15 or a.qwen15_only:
            measure("make_qwen15_shaped", [py, str(TOOLS / "make_qwen15_shaped.py"), str(hf), str(q15)], steps)
            figures["qwen15_sizes_mb"] = convert_steps(wrapper, q15, a.work / "qwen15_out", "qwen15",
                                                       "qwen15-shaped convert", a.threads, steps)
        if not a.qwen15_only:
            comparisons(a.standin, hf, out, a.prompts, a.threads, figures)
    finally:
        if not a.keep:
            for d in ("hf", "out", "qwen15", "qwen15_out"):
                shutil.rmtree(a.work / d, ignore_errors=True)
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
