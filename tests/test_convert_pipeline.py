"""The convert command: outputs, manifest, re-run skipping, interruption, and every input failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge.cli import cli
from edge.convert import pipeline
from edge.convert.manifest import sha256_of
from edge.convert.pipeline import ConvertRequest, run_conversion

ROOT = Path(__file__).resolve().parent.parent


def convert(*args: str):
    return CliRunner().invoke(cli, ["convert", "--no-progress", *args], catch_exceptions=False)


def gguf_like(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".gguf" in p.name) if folder.exists() else []


def test_cli_writes_requested_types_and_manifest(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    res = convert("--from-dir", str(tiny_hf_dir), "--out", str(out), "--types", "q8_0,f32", "--name", "tiny")
    assert res.exit_code == 0, res.output
    assert gguf_like(out) == ["tiny-f32.gguf", "tiny-q8_0.gguf"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"folder": str(tiny_hf_dir.resolve()), "name": "tiny"}
    assert {"gguf", "llama-cpp-python", "numpy"} <= set(manifest["tools"])
    by_type = {f["type"]: f for f in manifest["files"]}
    assert set(by_type) == {"f32", "q8_0"}
    for kind, entry in by_type.items():
        path = out / entry["file"]
        assert entry["size"] == path.stat().st_size and entry["sha256"] == sha256_of(path)
        assert entry["tensor_count"] == 27
    assert "written" in res.output and str(out / "tiny-q8_0.gguf") in res.output


def test_rerun_skips_matching_outputs_and_redoes_changed_ones(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    first = run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="t"))
    assert [e.type for e in first.written] == ["f32", "q8_0", "q4_k_m"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    again = run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="t"))
    assert again.written == [] and len(again.skipped) == 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == stamps
    # a damaged file no longer matches its entry and is rebuilt
    with open(out / "t-q8_0.gguf", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"xxxxxxxxxx")
    third = run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="t"))
    assert [e.type for e in third.written] == ["q8_0"]
    assert sha256_of(out / "t-q8_0.gguf") == first.written[1].sha256  # llama.cpp's quantizer is deterministic


def test_interrupted_run_leaves_no_final_named_file(tiny_hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = pipeline.quantize_gguf

    def interrupted(src, dst, quant_type, n_threads=0):
        real(src, dst, quant_type, n_threads)  # the temporary file is complete...
        raise KeyboardInterrupt                # ...but the run stops before the rename

    monkeypatch.setattr(pipeline, "quantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="t", types=("f32", "q8_0")))
    assert gguf_like(out) == ["t-f32.gguf"]
    assert [f["type"] for f in json.loads((out / "manifest.json").read_text())["files"]] == ["f32"]


def test_temporaries_of_a_killed_run_are_removed(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".t-f32.gguf.tmp-99999").write_bytes(b"GGUF half written")
    (out / ".manifest.json.tmp-99999").write_text('{"files": [')
    run_conversion(ConvertRequest(out_dir=out, from_dir=tiny_hf_dir, name="t", types=("f32",)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "t-f32.gguf"]


def _break_arch(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d: Path) -> None:
    path = d / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)


def _corrupt_header(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")


def _huge_header(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))


def _tokenizer_too_big(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    n_vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    tok["added_tokens"].append({"id": n_vocab + 5, "content": "<|extra|>", "special": True, "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False})
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _missing_tensor(d: Path) -> None:
    from tiny_checkpoint import write_safetensors
    from edge.convert.safetensors_reader import SafetensorsCheckpoint
    ck = SafetensorsCheckpoint.open(d)
    kept = {n: (e.dtype, e.shape, ck.read_f32(n).tobytes()) for n, e in ck.entries.items()
            if n != "model.layers.1.mlp.up_proj.weight"}
    write_safetensors(d / "model.safetensors", {n: ("F32", s, b) for n, (_, s, b) in kept.items()})


def _wrong_shape(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))


def _int8_tensor(d: Path) -> None:
    from tiny_checkpoint import write_safetensors
    write_safetensors(d / "model.safetensors", {"model.embed_tokens.weight": ("I8", (2, 2), b"\0" * 4)})


FAILURES = {
    "unsupported-arch": (_break_arch, ["config.json", "unsupported architecture LlamaForCausalLM"]),
    "no-config": (lambda d: (d / "config.json").unlink(), ["config.json: missing"]),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ["no tokenizer", "tokenizer.json"]),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), ["no safetensors weights"]),
    "missing-tensor": (_missing_tensor, ["missing tensor model.layers.1.mlp.up_proj.weight"]),
    "truncated": (_truncate, ["model.safetensors", "truncated safetensors file"]),
    "corrupt-header": (_corrupt_header, ["model.safetensors", "corrupt safetensors header"]),
    "huge-header": (_huge_header, ["model.safetensors", "corrupt or truncated safetensors header"]),
    "tokenizer-vs-vocab": (_tokenizer_too_big, ["tokenizer.json", "tokenizer has", "embedding has"]),
    "wrong-shape": (_wrong_shape, ["model.layers.0.mlp.gate_proj.weight has shape [512, 256]",
                                   "config.json implies [1024, 256]"]),
    "unsupported-dtype": (_int8_tensor, ["model.safetensors", "unsupported dtype I8"]),
    "bad-config-json": (lambda d: (d / "config.json").write_text("{nope"), ["config.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_input_gives_one_line_error_and_no_output(tiny_hf_dir, tmp_path, case):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, src)
    damage, expected = FAILURES[case]
    damage(src)
    out = tmp_path / "out"
    res = convert("--from-dir", str(src), "--out", str(out))
    assert res.exit_code != 0
    message = res.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    for part in expected:
        assert part in message, message
    assert gguf_like(out) == []


def test_sharded_index_naming_a_missing_shard(tmp_path):
    from tiny_checkpoint import TinySpec, build_tiny_checkpoint
    ck = build_tiny_checkpoint(tmp_path / "hf", TinySpec(shards=2))
    (ck.path / "model-00002-of-00002.safetensors").unlink()
    res = convert("--from-dir", str(ck.path), "--out", str(tmp_path / "out"))
    assert res.exit_code != 0
    assert "model-00002-of-00002.safetensors: missing shard" in res.output


def test_unknown_type_is_a_usage_error(tiny_hf_dir, tmp_path):
    res = convert("--from-dir", str(tiny_hf_dir), "--out", str(tmp_path / "o"), "--types", "q5_k")
    assert res.exit_code == 2 and "q5_k" in res.output


def test_wrapper_script_fails_cleanly_without_traceback(tmp_path):
    """The shell wrapper → console script path, with a folder that is not a model."""
    (tmp_path / "empty").mkdir()
    res = subprocess.run([str(ROOT / "scripts/convert_and_quantize.sh"), "--from-dir", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip() == f"Error: {tmp_path / 'empty' / 'config.json'}: missing (not a Hugging Face model folder?)"
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    res = subprocess.run([sys.executable, "-m", "edge.cli", "convert", "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot download Qwen/Qwen1.5-0.5B-Chat@"), res.stderr


def test_conversion_streams_tensors_with_bounded_memory(tiny_hf_dir, tmp_path):
    """A 0.5 GB F32 output converted in a child process whose peak RSS stays far below that size."""
    from tiny_checkpoint import write_safetensors
    from edge.convert.safetensors_reader import SafetensorsCheckpoint
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = rows = 1 << 18  # 262,144 rows: 2 x 256 MiB of F32 (embedding + lm_head)
    (src / "config.json").write_text(json.dumps(cfg))
    ck = SafetensorsCheckpoint.open(tiny_hf_dir)
    tensors = {n: ("F32", e.shape, ck.read_f32(n).tobytes()) for n, e in ck.entries.items()}
    big = np.full((rows, cfg["hidden_size"]), 0.01, dtype=np.float16).tobytes()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = ("F16", (rows, cfg["hidden_size"]), big)
    write_safetensors(src / "model.safetensors", tensors)
    del tensors, big
    code = ("import sys; from edge.cli import main; sys.argv = ['qwen-edge', 'convert', '--from-dir', "
            f"'{src}', '--out', '{tmp_path / 'out'}', '--types', 'f32', '--no-progress']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            # VmHWM belongs to this process image (ru_maxrss would carry pytest's peak across exec)
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peak_mib = int(res.stdout.strip().splitlines()[-1]) / 1024
    f32_mib = (tmp_path / "out" / "hf-f32.gguf").stat().st_size / 2**20
    assert f32_mib > 500
    assert peak_mib < 250, f"peak RSS {peak_mib:.0f} MiB for a {f32_mib:.0f} MiB output"


def test_hub_source_is_pinned_and_recorded(tiny_hf_dir, tmp_path, monkeypatch):
    """The download path (no network here): the pinned revision and only the needed files are asked for."""
    import huggingface_hub

    from edge.convert.hf_source import ALLOW_PATTERNS
    from edge.settings import DEFAULT_REPO, DEFAULT_REVISION
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tiny_hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = convert("--out", str(tmp_path / "out"), "--types", "f32")
    assert res.exit_code == 0, res.output
    assert calls == [{"repo_id": DEFAULT_REPO, "revision": DEFAULT_REVISION, "allow_patterns": ALLOW_PATTERNS,
                      "cache_dir": None}]
    assert len(DEFAULT_REVISION) == 40 and all(c in "0123456789abcdef" for c in DEFAULT_REVISION)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == {"repo": DEFAULT_REPO, "revision": DEFAULT_REVISION, "name": "qwen1.5-0.5b-chat"}
    assert gguf_like(tmp_path / "out") == ["qwen1.5-0.5b-chat-f32.gguf"]


def test_out_defaults_to_configured_model_dir(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EDGE_MODEL__DIR", str(tmp_path / "models"))
    res = convert("--from-dir", str(tiny_hf_dir), "--types", "f32", "--name", "tiny")
    assert res.exit_code == 0, res.output
    assert gguf_like(tmp_path / "models") == ["tiny-f32.gguf"]
