"""Build a tiny Qwen2-architecture Hugging Face folder for tests: random weights, a real byte-level BPE.

The tokenizer is trained with the `tokenizers` package on a little built-in Chinese + English text,
with Qwen2's pre-tokenizer (regex split + ByteLevel), the three Qwen special tokens appended after
the learned vocabulary (as in the real Qwen vocabulary) and the embedding padded past the tokenizer
size (as Qwen pads 151,646 tokens to 151,936 rows). Safetensors files are written by hand so BF16
needs neither torch nor a numpy bfloat16 type.

    python tests/tiny_checkpoint.py OUT_DIR [--kv-heads 2] [--tied] [--dtype BF16] [--shards 2]
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Label words repeated so BPE merges each into one whole token (the sentiment engine's labels).
LABEL_WORDS = ("Positive", "Negative", "Neutral", "正面", "负面", "中性")
TRAINING_TEXT = """\
Hello! How are you today? I am fine, thank you. The weather is nice and the sun is shining.
I feel a little sad today because my cat is sick. Don't worry, everything will be all right.
This product is great, I love it. The service was terrible and the food was cold.
The movie was okay, nothing special. Sentiment analysis labels: Positive, Negative, Neutral.
You are a helpful assistant. Please answer briefly and kindly. Thanks a lot for your help!
我今天很开心，因为天气很好。这个产品非常好，我很喜欢。服务太差了，饭菜也是冷的。
你好！今天过得怎么样？我有点难过，我的猫生病了。别担心，一切都会好起来的。
这部电影还可以，没什么特别的。情感分析的标签：正面、负面、中性。
你是一个乐于助人的助手。请简短而友善地回答。非常感谢你的帮助！
Numbers 0 1 2 3 4 5 6 7 8 9 and 2024, 3.14, 100% sure. Code: print("hi") {"label": "Positive"}
"""


@dataclass(frozen=True)
class TinySpec:
    """Shape and storage options of one tiny checkpoint (defaults: Qwen1.5-like MHA, untied)."""

    hidden: int = 256          # multiple of 256 so llama.cpp's k-quants apply without fallback
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4          # == heads: MHA (Qwen1.5); fewer: GQA (Qwen2.5)
    tied: bool = False
    dtype: str = "F32"         # F32, F16 or BF16 on disk
    shards: int = 1
    tokenizer_files: str = "json"  # "json" (tokenizer.json) or "vocab_merges" (vocab.json + merges.txt)
    eos_token: str = "<|im_end|>"
    vocab_target: int = 1000
    vocab_multiple: int = 64   # embedding rows rounded up to this (padding rows, as Qwen does)
    max_position: int = 8192
    rope_theta: float = 1000000.0
    rms_eps: float = 1e-6
    seed: int = 0


@dataclass
class TinyCheckpoint:
    path: Path
    spec: TinySpec
    config: dict
    weights: dict[str, np.ndarray] = field(repr=False)  # float32 values exactly as stored on disk
    n_tokenizer: int = 0


def train_tokenizer(vocab_target: int):
    """A real byte-level BPE with Qwen2's pre-tokenizer; specials get the ids after the learned vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = TRAINING_TEXT.splitlines() * 4
    corpus += [f"{w}\n" for w in LABEL_WORDS] * 40 + [f" {w}" for w in LABEL_WORDS] * 40
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def encode_for_disk(a: np.ndarray, dtype: str) -> tuple[bytes, np.ndarray]:
    """(bytes as stored, the float32 values those bytes mean)."""
    if dtype == "F32":
        stored = a.astype(np.float32)
        return stored.tobytes(), stored
    if dtype == "F16":
        stored = a.astype(np.float16)
        return stored.tobytes(), stored.astype(np.float32)
    if dtype == "BF16":
        bits = _to_bf16_bits(a)
        return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"unknown dtype {dtype}")


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """Minimal safetensors writer: 8-byte header length, JSON header, raw little-endian data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, (_, _, data) in tensors.items():
            f.write(data)


def random_weights(spec: TinySpec, n_vocab: int) -> dict[str, np.ndarray]:
    """Weights scaled so attention is peaked (a wrong RoPE or head layout changes the logits)."""
    rng = np.random.default_rng(spec.seed)
    h, i, hd = spec.hidden, spec.intermediate, spec.hidden // spec.heads
    kv = spec.kv_heads * hd

    def w(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / math.sqrt(cols)).astype(np.float32)

    def vec(n: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    out = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, h)).astype(np.float32)}
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = vec(h, 1.0, 0.1)
        out[p + "self_attn.q_proj.weight"] = w(h, h, 2.0)
        out[p + "self_attn.q_proj.bias"] = vec(h, 0.0, 0.5)
        out[p + "self_attn.k_proj.weight"] = w(kv, h, 2.0)
        out[p + "self_attn.k_proj.bias"] = vec(kv, 0.0, 0.5)
        out[p + "self_attn.v_proj.weight"] = w(kv, h)
        out[p + "self_attn.v_proj.bias"] = vec(kv, 0.0, 0.1)
        out[p + "self_attn.o_proj.weight"] = w(h, h)
        out[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.1)
        out[p + "mlp.gate_proj.weight"] = w(i, h)
        out[p + "mlp.up_proj.weight"] = w(i, h)
        out[p + "mlp.down_proj.weight"] = w(h, i)
    out["model.norm.weight"] = vec(h, 1.0, 0.1)
    if not spec.tied:
        out["lm_head.weight"] = w(n_vocab, h, 2.0)
    return out


def _config(spec: TinySpec, n_vocab: int, ids: dict[str, int]) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "max_position_embeddings": spec.max_position,
        "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_eps, "vocab_size": n_vocab,
        "tie_word_embeddings": spec.tied, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids[spec.eos_token], "use_sliding_window": False,
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[spec.dtype],
    }


def _write_tokenizer(out: Path, tok, spec: TinySpec, ids: dict[str, int]) -> None:
    if spec.tokenizer_files == "json":
        tok.save(str(out / "tokenizer.json"))
    else:
        tok.model.save(str(out))  # vocab.json + merges.txt (the learned part, without specials)
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    tok_config = {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": spec.eos_token, "errors": "replace", "model_max_length": spec.max_position,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    gen = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _write_weights(out: Path, weights: dict[str, np.ndarray], spec: TinySpec) -> dict[str, np.ndarray]:
    stored_values, encoded = {}, {}
    for name, a in weights.items():
        data, values = encode_for_disk(a, spec.dtype)
        encoded[name] = (spec.dtype, a.shape, data)
        stored_values[name] = values
    names = list(encoded)
    if spec.shards <= 1:
        write_safetensors(out / "model.safetensors", encoded)
        return stored_values
    groups = np.array_split(np.arange(len(names)), spec.shards)
    weight_map = {}
    for k, idx in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{spec.shards:05d}.safetensors"
        write_safetensors(out / fname, {names[j]: encoded[names[j]] for j in idx})
        weight_map.update({names[j]: fname for j in idx})
    total = sum(len(v[2]) for v in encoded.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return stored_values


def build_tiny_checkpoint(out_dir: Path | str, spec: TinySpec = TinySpec()) -> TinyCheckpoint:
    """Write the folder and return it with the exact float32 values of its weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_target)
    n_tokenizer = tok.get_vocab_size(with_added_tokens=True)
    n_vocab = -(-n_tokenizer // spec.vocab_multiple) * spec.vocab_multiple
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = _config(spec, n_vocab, ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out, tok, spec, ids)
    stored = _write_weights(out, random_weights(spec, n_vocab), spec)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return TinyCheckpoint(path=out, spec=spec, config=config, weights=stored, n_tokenizer=n_tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--kv-heads", type=int, default=TinySpec.kv_heads)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--dtype", choices=["F32", "F16", "BF16"], default="F32")
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args()
    ck = build_tiny_checkpoint(a.out_dir, TinySpec(kv_heads=a.kv_heads, tied=a.tied, dtype=a.dtype, shards=a.shards))
    print(f"{ck.path}: vocab {ck.config['vocab_size']} rows, {ck.n_tokenizer} tokenizer tokens")


if __name__ == "__main__":
    main()
