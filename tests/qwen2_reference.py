"""A numpy forward pass of a Qwen2ForCausalLM, written from the architecture, in float64.

RMSNorm, q/k/v projections with bias, rotary embedding (the "rotate half" / NeoX layout HF uses),
causal grouped-query attention, SwiGLU MLP, final norm, lm_head (or the tied embedding).
"""
from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x: (tokens, heads, head_dim); position = token index."""
    n, _, d = x.shape
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(x: np.ndarray, w: dict, p: str, cfg: dict) -> np.ndarray:
    n = x.shape[0]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    q = (x @ w[p + "q_proj.weight"].T + w[p + "q_proj.bias"]).reshape(n, heads, d)
    k = (x @ w[p + "k_proj.weight"].T + w[p + "k_proj.bias"]).reshape(n, kv_heads, d)
    v = (x @ w[p + "v_proj.weight"].T + w[p + "v_proj.bias"]).reshape(n, kv_heads, d)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    group = heads // kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((n, n), dtype=bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
    return out @ w[p + "o_proj.weight"].T


def forward(weights: dict[str, np.ndarray], cfg: dict, token_ids: list[int]) -> np.ndarray:
    """Logits (tokens, vocab) for every position."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][token_ids]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        x = x + _attention(rms_norm(x, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
