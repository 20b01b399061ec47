"""Qwen3.5-MoE checkpoints: config extraction and name mapping (names already match the packed ones)."""

from __future__ import annotations

from ..errors import ConversionError
from . import normalize_config, source_dense_specs

ARCHITECTURE = "qwen3_5_moe"
MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")

# transformers' Qwen3_5MoeTextConfig defaults, applied to fields a config.json leaves out.
DEFAULTS = {
    "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "head_dim": 256, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 8, "num_experts": 256,
}


def extract_config(raw: dict) -> dict:
    if raw.get("model_type") == "qwen3_5_moe":  # multimodal wrapper: the language model is text_config
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConversionError("config.json: model_type qwen3_5_moe without a text_config")
        text = dict(text)
        if text.get("tie_word_embeddings") is None:
            text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
        text.setdefault("model_type", "qwen3_5_moe_text")
    else:
        text = dict(raw)
    return normalize_config(text, DEFAULTS)


def source_specs(config: dict) -> dict:
    return source_dense_specs(ARCHITECTURE, config)


def to_packed(name: str, array, config: dict):
    """Checkpoint tensor -> [(packed name, array)]."""
    if name.endswith("conv1d.weight"):
        return [(name, array.reshape(array.shape[0], array.shape[2]))]
    return [(name, array)]
