"""HF config and tensor names → GGUF hyperparameters and tensor names, for the Qwen2 family.

Names come from gguf-py's own table (``gguf.get_tensor_name_map`` for ``MODEL_ARCH.QWEN2``), so a
tensor llama.cpp's converter knows is named the way llama.cpp's loader expects.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edge.convert.errors import ConversionError

ARCH = gguf.MODEL_ARCH.QWEN2
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
# HF tensors that carry no weights llama.cpp needs.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# config.json key -> (Hyperparams field, required)
CONFIG_FIELDS = {
    "hidden_size": ("hidden", True), "intermediate_size": ("intermediate", True),
    "num_hidden_layers": ("layers", True), "num_attention_heads": ("heads", True),
    "num_key_value_heads": ("kv_heads", False), "max_position_embeddings": ("context_length", True),
    "rope_theta": ("rope_theta", False), "rms_norm_eps": ("rms_eps", True), "vocab_size": ("vocab_size", True),
    "tie_word_embeddings": ("tied", False),
}


@dataclass(frozen=True)
class Hyperparams:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def read_hyperparams(folder: Path) -> Hyperparams:
    """Parse and check config.json; raise ConversionError for anything we cannot convert."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing (not a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ConversionError(f"{path}: unsupported architecture {', '.join(map(str, archs))} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    values: dict[str, Any] = {"rope_theta": 10000.0, "tied": False}
    for key, (field, required) in CONFIG_FIELDS.items():
        if key in config:
            values[field] = config[key]
        elif required:
            raise ConversionError(f"{path}: missing {key}")
    values.setdefault("kv_heads", values["heads"])
    hp = Hyperparams(**values)
    if hp.hidden % hp.heads or hp.heads % hp.kv_heads:
        raise ConversionError(f"{path}: hidden_size {hp.hidden}, {hp.heads} heads and {hp.kv_heads} KV heads "
                              "do not divide")
    return hp


def expected_shapes(hp: Hyperparams) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor the converted model needs."""
    h, i, kv = hp.hidden, hp.intermediate, hp.kv_heads * hp.head_dim
    per_block = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    shapes = {"model.embed_tokens.weight": (hp.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(hp.layers):
        shapes.update({f"model.layers.{n}.{k}": v for k, v in per_block.items()})
    if not hp.tied:
        shapes["lm_head.weight"] = (hp.vocab_size, h)
    return shapes


def tensor_plan(hp: Hyperparams, available: dict[str, tuple[int, ...]], where: Path) -> list[tuple[str, str]]:
    """[(gguf name, hf name)] in a stable order; every needed tensor present with the right shape."""
    name_map = gguf.get_tensor_name_map(ARCH, hp.layers)
    plan = []
    for hf_name, shape in expected_shapes(hp).items():
        if hf_name not in available:
            raise ConversionError(f"{where}: missing tensor {hf_name}")
        if tuple(available[hf_name]) != shape:
            raise ConversionError(f"{where}: tensor {hf_name} has shape {list(available[hf_name])}, "
                                  f"config.json implies {list(shape)}")
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{where}: no GGUF name for tensor {hf_name}")
        plan.append((gguf_name, hf_name))
    used = {hf_name for _, hf_name in plan}
    extra = [n for n in available if n not in used and not n.endswith(IGNORED_SUFFIXES)]
    if extra and not (hp.tied and extra == ["lm_head.weight"]):
        raise ConversionError(f"{where}: unexpected tensor {extra[0]} for {SUPPORTED_ARCHITECTURES[0]} "
                              f"({len(extra)} in all)")
    return plan
