"""Qwen3-Next checkpoints: config extraction and the de-interleave of the fused DeltaNet projections.

in_proj_qkvz rows are grouped per key head as [q (dk) | k (dk) | v (r*dv) | z (r*dv)], r = Hv/Hk, and
in_proj_ba rows as [b (r) | a (r)] (transformers' fix_query_key_value_ordering). The packed model
stores Qwen3.5's in_proj_qkv = [q of all heads | k | v], in_proj_z, in_proj_b, in_proj_a instead.
"""

from __future__ import annotations

import numpy as np

from . import linear_attn_dims, normalize_config, source_dense_specs

ARCHITECTURE = "qwen3_next"
MODEL_TYPES = ("qwen3_next",)

# transformers' Qwen3NextConfig defaults.
DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "decoder_sparse_step": 1,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10,
    "num_experts": 512, "norm_topk_prob": True, "mlp_only_layers": [],
}


def extract_config(raw: dict) -> dict:
    return normalize_config(raw, DEFAULTS)


def source_specs(config: dict) -> dict:
    specs = {}
    hk, hv, dk, dv = linear_attn_dims(config)
    h = config["hidden_size"]
    for name, shape in source_dense_specs(ARCHITECTURE, config).items():
        if name.endswith("linear_attn.in_proj_qkv.weight"):
            specs[name.replace("in_proj_qkv", "in_proj_qkvz")] = (2 * hk * dk + 2 * hv * dv, h)
        elif name.endswith("linear_attn.in_proj_b.weight"):
            specs[name.replace("in_proj_b", "in_proj_ba")] = (2 * hv, h)
        elif name.endswith(("linear_attn.in_proj_z.weight", "linear_attn.in_proj_a.weight")):
            continue
        else:
            specs[name] = shape
    return specs


def split_qkvz(w, config: dict):
    """in_proj_qkvz [Hk*(2dk+2r*dv), H] -> (in_proj_qkv, in_proj_z)."""
    hk, hv, dk, dv = linear_attn_dims(config)
    r = hv // hk
    g = w.reshape(hk, 2 * dk + 2 * r * dv, w.shape[-1])
    q, k = g[:, :dk], g[:, dk:2 * dk]
    v, z = g[:, 2 * dk:2 * dk + r * dv], g[:, 2 * dk + r * dv:]
    cols = w.shape[-1]
    qkv = np.concatenate([q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)])
    return qkv, np.ascontiguousarray(z.reshape(-1, cols))


def split_ba(w, config: dict):
    """in_proj_ba [Hk*2r, H] -> (in_proj_b, in_proj_a)."""
    hk, hv, _, _ = linear_attn_dims(config)
    r = hv // hk
    g = w.reshape(hk, 2 * r, w.shape[-1])
    cols = w.shape[-1]
    return np.ascontiguousarray(g[:, :r].reshape(-1, cols)), np.ascontiguousarray(g[:, r:].reshape(-1, cols))


def to_packed(name: str, array, config: dict):
    """Checkpoint tensor -> [(packed name, array)]."""
    if name.endswith("linear_attn.in_proj_qkvz.weight"):
        qkv, z = split_qkvz(array, config)
        base = name[: -len("in_proj_qkvz.weight")]
        return [(base + "in_proj_qkv.weight", qkv), (base + "in_proj_z.weight", z)]
    if name.endswith("linear_attn.in_proj_ba.weight"):
        b, a = split_ba(array, config)
        base = name[: -len("in_proj_ba.weight")]
        return [(base + "in_proj_b.weight", b), (base + "in_proj_a.weight", a)]
    if name.endswith("conv1d.weight"):
        return [(name, array.reshape(array.shape[0], array.shape[2]))]
    return [(name, array)]
